"""nemo_quant: in-place model optimization modes for Megatron-core GPT models."""
import warnings as _warnings

__version__ = "0.1.0"

# megatron-core warns at import time that apex / Transformer Engine are absent; on CPU that is
# the expected configuration, and nemo_quant reports its own backend choices.
for _pattern in (".*Transformer Engine and Apex are not installed.*", ".*Apex is not installed.*",
                 ".*full scope is deprecated.*", ".*CUDA_DEVICE_MAX_CONNECTIONS.*",
                 ".*all_gather_into_tensor` is deprecated.*"):
    _warnings.filterwarnings("ignore", message=_pattern)
