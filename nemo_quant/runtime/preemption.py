"""Preemption: the scheduler's warning becomes a checkpoint and a clean exit, so the requeued job
resumes where it stopped.

The Slurm launcher (nemo_quant/integrations/slurm.py) traps the warning signal in the batch
shell and creates the file named by $NEMO_QUANT_PREEMPT_FILE. Signals are not forwarded to the
ranks: torchrun's agent dies of SIGUSR1 and srun signals only what it started. Every rank looks
for the file after each step and they agree by a MAX all-reduce, so all ranks stop at the same
step and write one checkpoint together.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

PREEMPT_FILE_ENV = "NEMO_QUANT_PREEMPT_FILE"
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: try again later (the launcher requeues)


class Preempted(Exception):
    """Raised by the training loop once the preemption checkpoint is written."""

    def __init__(self, step: int, checkpoint: str):
        super().__init__(f"preempted after step {step}; checkpoint {checkpoint} written, the next run resumes from it")
        self.step, self.checkpoint = step, checkpoint


def preemption_requested() -> bool:
    """True on every rank once any rank sees the preemption file (collective when the launcher set it)."""
    path = os.environ.get(PREEMPT_FILE_ENV)
    if not path:
        return False
    flag = torch.tensor([int(os.path.exists(path))])
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())
