"""nemo_quant: in-place model optimization modes for Megatron-core GPT models.

Public API (imported lazily so `import nemo_quant` stays cheap):
    apply_modes(model, [(name, cfg), ...])   mutate the model in place
    calibrate(model, forward_loop)           collect statistics and set scales
    sparsify(model, forward_loop)            choose the n:m masks of the sparsity mode
    prune(model, forward_loop)               measure importance and shrink the model (prune mode)
    restore_modes(model, state)              replay saved modes before loading weights
    mode_state(model)                        the JSON-able mode state to save
"""
import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns at import time that apex / Transformer Engine are absent; on CPU that is
# the expected configuration, and nemo_quant reports its own backend choices.
for _pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                 ".*full scope is deprecated.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
                 ".*all_gather_into_tensor` is deprecated.*"):
    _warnings.filterwarnings("ignore", message=_pattern)

_API = {
    "apply_modes": "nemo_quant.modes",
    "restore_modes": "nemo_quant.modes",
    "mode_state": "nemo_quant.modes",
    "calibrate": "nemo_quant.quantization.calibrate",
    "sparsify": "nemo_quant.sparsity.one_shot",
    "prune": "nemo_quant.pruning.mode",
}
__all__ = sorted(_API)


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'nemo_quant' has no attribute {name!r}")
