#!/usr/bin/env bash
# PTQ of SmolLM2-135M (or MODEL=...) -> deployable checkpoint(s), validated.
#   recipes/ptq_export.sh [OUT=outputs/ptq] [QUANT=fp8] [FORMAT=both] [extra overrides...]
# QUANT: any conf/quant preset (fp8, fp8_gptq, int8_sq, int4_awq, w4a8_awq, nvfp4, nvfp4_awq, mxfp8, auto);
#   int4_awq / w4a8_awq on SmolLM2 need quant.weight.block_size=64 for a deployable export (576 = 9 x 64).
# FORMAT: both (unified HF + TensorRT-LLM), hf, trtllm, compressed_tensors (vLLM's loader; with int8_sq or
#   an AWQ preset add quant.search.fold_all_scales=true: that format has no place for smoothing scales).
# 1) calibration + perplexity on Persuasion before and after, in the run's results.json;
# 2) the checkpoint(s), validated by reading them back.
# Expected on SmolLM2 (FP32 37.033; README "Accuracy", 2 CPU cores): fp8 37.817 (calibration 28.6 s),
#   int8_sq 37.796 (44.3 s), fp8_gptq 37.610 (91.8 s), int4_awq g64 42.491 (56.6 s), nvfp4_awq 40.623 (54.4 s).
#   Wall time: the calibration above plus two perplexity passes (~40 s each; the FP32 one is cached) and
#   the export (~10 s).
set -euo pipefail
source "$(dirname "$0")/lib.sh"
OUT=${OUT:-outputs/ptq}
QUANT=${QUANT:-fp8}
FORMAT=${FORMAT:-both}
ptq=(ptq quant="$QUANT" export="$FORMAT" export.path="$OUT/deploy" export.overwrite=true $MODEL_ARG "$@")
check_steps ptq
run_steps ptq
if [ "$FORMAT" = both ]; then $NQ validate "$OUT/deploy/hf" "$OUT/deploy/trtllm"; else $NQ validate "$OUT/deploy"; fi
