"""Cache of unquantized (baseline) perplexities, so `ptq` and the demo do not re-evaluate the
same model on the same windows every run (minutes on SmolLM2, hours on a real model).

The key is a fingerprint of everything the figure depends on: the weight files (path, size,
modification time of each), the evaluation tokens (sha256), the model dtype, the TP x PP layout
(fp32 reductions differ in the last bits across layouts), the batch size and the versions of
nemo_quant, megatron-core and torch. Entries are small
JSON files under $NEMO_QUANT_CACHE (default ~/.cache/nemo_quant)/baselines; a run that uses
one says so.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from nemo_quant.data.windows import fingerprint
from nemo_quant.utils.cache import cache_root


def _cache_root() -> Path:
    return cache_root() / "baselines"


def weights_fingerprint(model_path: Path) -> str:
    files = sorted(p for p in model_path.rglob("*") if p.is_file()) if model_path.is_dir() else [model_path]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def baseline_key(model_path: Path, windows, dtype: str, tp: int, pp: int, batch_size: int) -> str:
    from importlib.metadata import version

    code = [f"{pkg}={version(pkg)}" for pkg in ("nemo_quant", "megatron-core", "torch")]
    parts = [weights_fingerprint(model_path), fingerprint(windows), dtype, f"tp{tp}", f"pp{pp}", f"b{batch_size}", *code]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def cached_baseline(key: str) -> float | None:
    path = _cache_root() / f"{key}.json"
    try:
        return float(json.loads(path.read_text())["perplexity"])
    except (FileNotFoundError, KeyError, ValueError):
        return None


def store_baseline(key: str, perplexity: float, description: dict) -> None:
    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{key}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"perplexity": perplexity, **description}, indent=2))
    tmp.replace(root / f"{key}.json")
