#!/usr/bin/env bash
# 2:4 sparsity + fine-tuning + FP8 on SmolLM2-135M (or MODEL=/path/to/model.gguf|hf-dir).
#   recipes/sparse_finetune_fp8.sh [OUT=outputs/sparse_fp8] [STEPS=200] [extra overrides...]
# 1) one-shot 2:4 (ADMM) and a mask-kept fine-tune (AdamW 0.9/0.95, lr 1e-5, 10 warm-up steps);
# 2) FP8 PTQ of the fine-tuned checkpoint (the masks stay: quantization follows sparsity);
# 3) unified HF + TensorRT-LLM checkpoints, validated (including every 2:4 pattern).
# Expected on SmolLM2 (Persuasion, FP32 37.03; benchmarks/results/sparsity.md): one-shot ADMM 65.95 (343 s),
#   after the 200-step fine-tune 51.23; + FP8 one-shot 67.37. Wall time: ~6 min one-shot + ~25 min fine-tune
#   (about 7 s a step alone on 2 cores) + ~2 min PTQ and export.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/sparse_fp8}
STEPS=${STEPS:-200}
finetune=(train sparsity=admm checkpoint.save="$OUT/ft" train.steps="$STEPS" train.save_every=50 train.lr=1e-5
          train.warmup_steps=10 'train.adam_betas=[0.9,0.95]' train.max_train_windows="$STEPS" $MODEL_ARG "$@")
ptq=(ptq quant=fp8 checkpoint.load="$OUT/ft" export=both export.path="$OUT/deploy" export.overwrite=true $MODEL_ARG "$@")
check_steps finetune ptq
run_steps finetune ptq
$NQ validate "$OUT/deploy/hf" "$OUT/deploy/trtllm"
