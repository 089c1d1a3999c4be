"""What the modes share about fnmatch patterns on Megatron linear layers (`quant.exclude`,
`sparsity.exclude`, `qlora.targets`).

Patterns name layers by their global name (decoder layer numbers counted over the whole
pipeline: `quantization.modules.global_name`), and each must hit a layer somewhere in the
pipeline: every rank counts hits on its own stage and `hits_on_all_ranks` sums them.
"""
from __future__ import annotations

import fnmatch
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from nemo_quant.config.validate import ConfigError


def linear_tp_axes() -> dict[type, int]:
    """The Megatron linear classes the modes convert -> their weight's TP split axis."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return {ColumnParallelLinear: 0, RowParallelLinear: 1}


def matching(name: str, patterns: list[str]) -> list[int]:
    """Indices of the patterns that match module `name`."""
    return [i for i, p in enumerate(patterns) if fnmatch.fnmatchcase(name, p)]


def linears_with_hits(model, patterns: list[str], skip: type) -> Iterator[tuple[str, object, int, list[int]]]:
    """(global name, module, weight TP axis, indices of the patterns it matches) of every Megatron
    Column/RowParallelLinear of this rank's stage that a mode has not converted yet (`skip`)."""
    from nemo_quant.models.gemm_operands import megatron_type
    from nemo_quant.quantization.modules import global_name

    axes = linear_tp_axes()
    for local_name, module in model.named_modules():
        if megatron_type(module) in axes and not isinstance(module, skip):
            name = global_name(model, local_name)
            yield name, module, axes[megatron_type(module)], matching(name, patterns)


def hits_on_all_ranks(plan: Callable[[], list[int]], count: int) -> list[int]:
    """Run this rank's `plan()` (its `count` hit counters; it may raise ConfigError), sum the
    counters over every rank, and only then re-raise this rank's problem: no rank is left
    waiting on a collective that a failing rank never joins."""
    problem, hits = None, [0] * count
    try:
        hits = list(plan())
    except ConfigError as e:
        problem = str(e)
    total = torch.tensor(hits, dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)
    if problem is not None:
        raise ConfigError(problem)
    return total.tolist()
