"""Write a checkpoint directory atomically: into a hidden sibling, renamed into place at the end.

A crash or an exception mid-write leaves no directory under the target name; an existing
target is replaced only when `overwrite` is set. All ranks call these together.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

from nemo_quant.distributed import barrier
from nemo_quant.runtime.distributed_init import is_main_rank


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, key: str = "checkpoint.save"):
    """Yields the staging directory every rank writes into."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{key}={target} already exists; choose another path or allow overwriting.")
    staging = target.parent / f".{target.name}.partial"
    if is_main_rank():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    try:
        yield staging
        barrier()
    except BaseException:
        if is_main_rank():
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if is_main_rank():
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    barrier()
