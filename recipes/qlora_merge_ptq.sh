#!/usr/bin/env bash
# QLoRA -> merge -> PTQ -> deployable checkpoint, on SmolLM2-135M (or MODEL=/path/to/model.gguf|hf-dir).
#   recipes/qlora_merge_ptq.sh [OUT=outputs/qlora] [STEPS=200] [QUANT=int4_awq] [extra overrides...]
# 1) QLoRA fine-tune: NF4 base (bitsandbytes' bytes), r 16 / alpha 32 adapters on every decoder linear,
#    AdamW 0.9/0.95, lr 2e-4, 10 warm-up steps (the benchmark protocol);
# 2) the NF4 base + PEFT adapter (what transformers + bitsandbytes + PEFT, vLLM and SGLang load), validated;
# 3) the merge dequant(W) + scaling * B A in bf16, then PTQ of the merge with QUANT and the unified HF
#    checkpoint, validated. (An NF4 re-quantization of the merge would erase the adapter: the merged
#    export prints how much.)
# Expected on SmolLM2 (benchmarks/results/qlora.md): NF4 base 45.75 -> 33.59 after 200 steps (bitsandbytes +
#   PEFT: 45.77 -> 33.54). Wall time: ~5 min training (1.33 s a step on 2 cores) + merge + PTQ (~2 min).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/qlora}
STEPS=${STEPS:-200}
QUANT=${QUANT:-int4_awq}
finetune=(train qlora=nf4 checkpoint.save="$OUT/ft" train.steps="$STEPS" train.save_every=50 train.lr=2e-4
          train.warmup_steps=10 'train.adam_betas=[0.9,0.95]' train.max_train_windows="$STEPS"
          export=peft export.path="$OUT/peft" export.overwrite=true $MODEL_ARG "$@")
merge=(export checkpoint.load="$OUT/ft" export=merged export.path="$OUT/merged" export.overwrite=true $MODEL_ARG "$@")
ptq=(ptq quant="$QUANT" model.path="$OUT/merged" export=hf export.path="$OUT/deploy" export.overwrite=true "$@")
check_steps finetune merge ptq
run_steps finetune
$NQ validate "$OUT/peft"
run_steps merge ptq
$NQ validate "$OUT/deploy"
