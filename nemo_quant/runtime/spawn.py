"""Run a function in N spawned gloo processes, as tests and small CPU jobs need.

Failures surface, never hang: each child reports its result or its traceback through a
queue; the parent waits with a deadline, and on the first failure or at the deadline it
kills every child and raises with the failing child's traceback.
"""
from __future__ import annotations

import os
import pickle
import queue
import time
import traceback
from typing import Any, Callable

import torch.multiprocessing as mp

from nemo_quant.runtime.distributed_init import free_port


class ChildProcessError(RuntimeError):
    """A spawned rank raised or died; the message holds its traceback."""


def _child(rank: int, world_size: int, port: int, timeout_s: float, fn, args, results) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        from nemo_quant.runtime.distributed_init import init_process_group, teardown

        init_process_group(timeout_s)
        value = fn(*args)
        # Plain pickle bytes, not the queue's shared-memory tensor handles: those die with this
        # process, which may exit before the parent reads them.
        results.put((rank, "ok", pickle.dumps(value)))
        teardown()
    except BaseException:  # report everything, including SystemExit, to the parent
        results.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 240) -> list[Any]:
    """Call `fn(*args)` on `world_size` ranks; returns the per-rank return values.

    `fn` must be importable (module-level) so the spawn context can pickle it.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, timeout_s, fn, args, results), daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    try:
        while len(values) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChildProcessError(f"ranks {sorted(set(range(world_size)) - set(values))} timed out after {timeout_s}s")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in values]
                if dead:
                    raise ChildProcessError(f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a report") from None
                continue
            if status == "error":
                raise ChildProcessError(f"rank {rank} failed:\n{value}")
            values[rank] = pickle.loads(value)  # bytes from our own child process
    finally:
        for p in procs:
            p.join(timeout=10 if len(values) == world_size else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    return [values[r] for r in range(world_size)]
