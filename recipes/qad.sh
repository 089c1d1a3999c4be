#!/usr/bin/env bash
# QAD of SmolLM2-135M: recipes/qat.sh with the unquantized model as the teacher (distill=logits).
#   recipes/qad.sh [OUT=outputs/qad] [QUANT=nvfp4] [STEPS=200] [FORMAT=hf] [extra overrides...]
set -euo pipefail
OUT=${OUT:-outputs/qad} DISTILL=logits exec "$(dirname "$0")/qat.sh" "$@"
