"""Write a checkpoint directory atomically: into a hidden sibling, renamed into place at the end.

A crash or an exception mid-write leaves no directory under the target name; an existing
target is replaced only when `overwrite` is set. All ranks call these together.
"""
from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextmanager
def atomic_directory(target: str | Path, overwrite: bool = False, key: str = "checkpoint.path"):
    """Yields the staging directory every rank writes into."""
    target = Path(target).expanduser().resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{key}={target} already exists; choose another path or allow overwriting.")
    staging = target.parent / f".{target.name}.partial"
    if _rank() == 0:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    barrier()
    try:
        yield staging
        barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if _rank() == 0:
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    barrier()
