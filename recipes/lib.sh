# Sourced by every recipe: the nemo-quant command, the model argument, and checks that let a
# recipe fail before its first step rather than hours into it.
NQ=${NQ:-nemo-quant}
MODEL_ARG=${MODEL:+model.path=$MODEL}
RECIPE=$(basename "$0")

if ! command -v "${NQ%% *}" >/dev/null; then
  echo "$RECIPE: '${NQ%% *}' not found: install nemo_quant (pip install <repo>) or set NQ=<command>" >&2
  exit 2
fi
if [ -n "${MODEL:-}" ] && [ ! -e "$MODEL" ]; then
  echo "$RECIPE: MODEL=$MODEL does not exist (a .gguf file or an HF safetensors directory); nothing was run" >&2
  exit 2
fi

# check_steps STEP...: each STEP names a bash array holding one nemo-quant call; every call must
# compose (`--cfg job`: presets, keys and types checked, no work done) before any of them runs.
check_steps() {
  local name out
  for name in "$@"; do
    local -n step="$name"
    if ! out=$($NQ "${step[@]}" --cfg job 2>&1 >/dev/null); then
      echo "$RECIPE: nothing was run: this step does not compose: nemo-quant ${step[*]}" >&2
      echo "$out" | grep -v '^$' | tail -n 4 >&2
      exit 2
    fi
  done
}

# run_steps STEP...: the calls, in order.
run_steps() {
  local name
  for name in "$@"; do
    local -n step="$name"
    $NQ "${step[@]}"
  done
}
