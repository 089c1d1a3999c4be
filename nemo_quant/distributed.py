"""Cross-rank synchronisation of quantizer statistics (rules in DESIGN.md).

Every rank calls `sync_amax` for every quantizer in the same (module) order, whatever data it
saw, so the collectives always line up; a rank without data contributes 0 to a max.
- DP replicas: max-reduce everything, so all replicas hold identical scales.
- TP: max-reduce per-tensor amax and row-parallel per-output-channel weight amax; keep
  column-parallel rows and blocks along a split dim local.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _groups():
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return None, None
    tp = ps.get_tensor_model_parallel_group() if ps.get_tensor_model_parallel_world_size() > 1 else None
    dp = ps.get_data_parallel_group() if ps.get_data_parallel_world_size() > 1 else None
    return tp, dp


def sync_amax(amax: torch.Tensor, reduce_over_tp: bool) -> torch.Tensor:
    tp, dp = _groups()
    if dp is not None:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=dp)
    if tp is not None and reduce_over_tp:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=tp)
    return amax
