#!/usr/bin/env bash
# Speculative-decoding heads on a frozen SmolLM2-135M (or MODEL=...) -> acceptance length -> draft checkpoint.
#   recipes/speculative_heads.sh [OUT=outputs/heads] [HEADS=eagle3] [STEPS=200] [overrides for every step...]
# 1) heads (HEADS: eagle3, eagle3_d2t, eagle1, medusa, mtp) trained on the base's own greedy continuations
#    of calibration prompts (generated once, cached), lr 1e-3 after 10 warm-up steps, AdamW 0.9/0.95,
#    micro-batch 4; the checkpoint holds only the heads;
# 2) tau for k = 1, 3, 5 on 64 Persuasion prompts (BENCHMARKS.md), in eval's results.json;
# 3) the draft checkpoint the engines load (EAGLE-3: LlamaForCausalLMEagle3 for vLLM / SGLang /
#    TensorRT-LLM PyTorch; Medusa: vLLM MedusaModel; MTP: DeepSeek-style names), validated. For Medusa
#    in TensorRT-LLM add: nemo-quant export checkpoint.load=... export=trtllm export.path=...
# SmolLM2 figures and wall times: benchmarks/results/speculative.md (the README's heads table).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/heads}
HEADS=${HEADS:-eagle3}
STEPS=${STEPS:-200}
heads=(train speculative="$HEADS" checkpoint.save="$OUT/heads" train.steps="$STEPS" train.save_every=50
       train.micro_batch_size=4 train.lr=1e-3 train.warmup_steps=10 'train.adam_betas=[0.9,0.95]'
       train.resume=false $MODEL_ARG "$@")
tau=(eval speculative="$HEADS" checkpoint.load="$OUT/heads" hydra.run.dir="$OUT/eval" $MODEL_ARG "$@")
draft=(export speculative="$HEADS" checkpoint.load="$OUT/heads" export=draft export.path="$OUT/draft"
       export.overwrite=true $MODEL_ARG "$@")
check_steps heads tau draft
run_steps heads tau draft
$NQ validate "$OUT/draft"
