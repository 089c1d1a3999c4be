"""Process-group and Megatron model-parallel initialisation.

One entry point for every way the package runs: plain `python` (a world of one), `torchrun`
(RANK/WORLD_SIZE/MASTER_* in the environment) and SLURM via torchrun. Every group is built
with a timeout so a rank that dies turns into an error on the others, never a hang.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from nemo_quant.runtime.cpu_shims import apply_cpu_shims

DEFAULT_TIMEOUT_S = 300


@dataclass(frozen=True)
class ParallelLayout:
    """Tensor x pipeline x data parallel sizes; data parallel is what is left of the world."""

    tp: int = 1
    pp: int = 1

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % (self.tp * self.pp):
            raise ValueError(
                f"parallel.tp ({self.tp}) x parallel.pp ({self.pp}) must divide the number of "
                f"processes ({world_size}); launch with torchrun --nproc-per-node "
                f"{self.tp * self.pp} or a multiple of it."
            )
        return world_size // (self.tp * self.pp)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_process_group(timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join (or create) the default process group; a lone process gets a world of one.

    A lone process does not export RANK/WORLD_SIZE, so subprocesses it starts (torchrun,
    tests) are not mistaken for its ranks."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    else:
        dist.init_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                rank=0, world_size=1, timeout=timeout)


def init_megatron(layout: ParallelLayout, seed: int = 1234, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Initialise torch.distributed, Megatron's parallel state and its RNG tracker."""
    from megatron.core import parallel_state, tensor_parallel

    cpu = apply_cpu_shims()
    init_process_group(timeout_s)
    layout.data_parallel_size(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        distributed_timeout_minutes=max(1, int(timeout_s // 60)),
    )
    torch.manual_seed(seed)
    if cpu:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    else:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def teardown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_main_rank() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
