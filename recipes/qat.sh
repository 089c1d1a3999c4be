#!/usr/bin/env bash
# QAT of SmolLM2-135M (or MODEL=...): PTQ -> training with the calibrated scales frozen -> eval -> export.
# With DISTILL=logits it is QAD (the quantized student learns the unquantized model's logits): recipes/qad.sh.
#   recipes/qat.sh [OUT=outputs/qat] [QUANT=nvfp4] [STEPS=200] [FORMAT=hf] [DISTILL=] [extra overrides...]
# 1) PTQ (QUANT, any conf/quant preset), saved; 2) STEPS of training from it (AdamW 0.9/0.95, lr 1e-5,
#    10 warm-up steps: BENCHMARKS.md's training protocol), checkpoints every 50 steps, resumable;
# 3) perplexity of the trained model on Persuasion; 4) the deployable checkpoint, validated.
# Expected on SmolLM2: PTQ as in recipes/ptq_export.sh; after 200 steps not measured yet
#   (`benchmarks/pruning.py --runs nvfp4_qat,nvfp4_qad,w4a8_qat,w4a8_qad` measures QAT against QAD).
#   Wall time: one distillation-sized run of 200 steps took 705-1370 s on 2 cores (README "Pruning").
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/qat}
QUANT=${QUANT:-nvfp4}
STEPS=${STEPS:-200}
FORMAT=${FORMAT:-hf}
ptq=(ptq quant="$QUANT" checkpoint.save="$OUT/ptq" checkpoint.overwrite=true $MODEL_ARG "$@")
train=(train checkpoint.load="$OUT/ptq" checkpoint.save="$OUT/train" train.steps="$STEPS" train.save_every=50
       train.lr=1e-5 train.warmup_steps=10 'train.adam_betas=[0.9,0.95]' ${DISTILL:+distill=$DISTILL} $MODEL_ARG "$@")
evaluate=(eval checkpoint.load="$OUT/train" hydra.run.dir="$OUT/eval" $MODEL_ARG "$@")
deploy=(export checkpoint.load="$OUT/train" export="$FORMAT" export.path="$OUT/deploy" export.overwrite=true
        $MODEL_ARG "$@")
check_steps ptq train evaluate deploy
run_steps ptq train evaluate deploy
if [ "$FORMAT" = both ]; then $NQ validate "$OUT/deploy/hf" "$OUT/deploy/trtllm"; else $NQ validate "$OUT/deploy"; fi
