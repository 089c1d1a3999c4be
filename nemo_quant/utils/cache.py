"""Where nemo_quant caches what it fetched or measured: $NEMO_QUANT_CACHE, else ~/.cache/nemo_quant."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("NEMO_QUANT_CACHE") or Path.home() / ".cache" / "nemo_quant")
