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
# compose (presets, keys and types checked, no work done; one process) before any of them runs.
check_steps() {
  local name out calls=()
  for name in "$@"; do
    local -n step="$name"
    calls+=(-- "${step[@]}")
  done
  if ! out=$($NQ compose-check "${calls[@]}" 2>&1); then
    echo "$RECIPE: nothing was run: a step does not compose:" >&2
    echo "$out" | grep -v '^$' | head -n 3 >&2
    exit 2
  fi
}

# run_steps STEP...: the calls, in order.
run_steps() {
  local name
  for name in "$@"; do
    local -n step="$name"
    $NQ "${step[@]}"
  done
}
