#!/usr/bin/env bash
# Minitron prune -> distillation -> PTQ -> deployable checkpoint, on SmolLM2-135M (or MODEL=...).
#   recipes/prune_distill_quantize.sh [OUT=outputs/prune] [PRUNE=minitron_ffn] [PRUNE_OVERRIDES="prune.target.x=..."]
#                                     [STEPS=200] [QUANT=fp8] [overrides for every step...]
# 1) one-shot pruning (PRUNE: minitron_ffn = FFN 1536 -> 1024, minitron_depth = 30 -> 22 layers,
#    minitron_budget = searched sizes for 108M parameters), perplexity and parameter count before/after;
# 2) recovery: forward KL on the logits (T=1) against the unpruned model, the benchmark protocol's
#    optimizer (AdamW 0.9/0.95, lr 1e-5, 10 warm-up steps);
# 3) PTQ of the recovered model with QUANT and the unified HF checkpoint (pruned shapes), validated.
# SmolLM2 figures (benchmarks/results/pruning.md): see the README's pruning table.
# Expected on SmolLM2 (README "Pruning"): FFN 1536 -> 1024 one-shot 61.87, after 200 distillation steps 48.18
#   (FP32 37.03). Wall time: ~12-17 min distillation on 2 cores (705 s alone for ModelOpt's pruned model),
#   plus pruning (~1 min) and PTQ + export (~2 min).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/prune}
PRUNE=${PRUNE:-minitron_ffn}
STEPS=${STEPS:-200}
QUANT=${QUANT:-fp8}
# shellcheck disable=SC2206  # PRUNE_OVERRIDES is a list of overrides
prune=(prune prune="$PRUNE" ${PRUNE_OVERRIDES:-} checkpoint.save="$OUT/pruned" checkpoint.overwrite=true $MODEL_ARG "$@")
distill=(train checkpoint.load="$OUT/pruned" distill=logits checkpoint.save="$OUT/kd" train.steps="$STEPS"
         train.save_every=50 train.lr=1e-5 train.warmup_steps=10 'train.adam_betas=[0.9,0.95]'
         train.max_train_windows="$STEPS" train.resume=false $MODEL_ARG "$@")
ptq=(ptq checkpoint.load="$OUT/kd" quant="$QUANT" export=hf export.path="$OUT/deploy" export.overwrite=true $MODEL_ARG "$@")
check_steps prune distill ptq
run_steps prune distill ptq
$NQ validate "$OUT/deploy"
