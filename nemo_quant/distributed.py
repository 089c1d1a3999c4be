"""Cross-rank collectives of nemo_quant: statistics sync (rules in DESIGN.md) and agreement.

Every rank calls `sync_amax` for every quantizer in the same (module) order, whatever data it
saw, so the collectives always line up; a rank without data contributes 0 to a max.
- DP replicas: max-reduce everything, so all replicas hold identical scales.
- TP: max-reduce statistics that span the TP group (per-tensor amax, row-parallel
  per-channel and global-block weight amax); column-parallel rows and blocks stay local.
All helpers are no-ops in a world of one.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def _multi_rank() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


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


def tp_rank_and_size() -> tuple[int, int]:
    """This rank's tensor-parallel rank and the TP size ((0, 1) without TP)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or not ps.model_parallel_is_initialized():
        return 0, 1
    return ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def tp_all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """In-place "sum" or "max" over the tensor-parallel group (identity without one)."""
    tp, _ = _groups()
    if tp is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=tp)
    return t


def dp_all_reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """In-place "sum" or "max" over the data-parallel group (identity without one)."""
    _, dp = _groups()
    if dp is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=dp)
    return t


def tp_all_gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Concatenate the tensor-parallel ranks' slices along `dim`, in rank order (identity without TP)."""
    tp, _ = _groups()
    if tp is None:
        return t
    if t.dtype == torch.bool:  # gloo has no bool collectives: masks travel as bytes
        return tp_all_gather(t.to(torch.uint8), dim).bool()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(tp))]
    dist.all_gather(parts, t.contiguous(), group=tp)
    return torch.cat(parts, dim=dim)


def dp_all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every data-parallel rank's rows (row counts may differ, even be 0)."""
    _, dp = _groups()
    if dp is None:
        return t
    parts: list = [None] * dist.get_world_size(dp)
    dist.all_gather_object(parts, t, group=dp)
    return torch.cat(parts)


def max_over_world(value: int) -> int:
    """The largest `value` of all ranks (e.g. a pass count every rank must run)."""
    if not _multi_rank():
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank."""
    if not _multi_rank():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_messages(message: str | None) -> list[str | None]:
    """Every rank's message (None = nothing to report), indexed by rank."""
    if not _multi_rank():
        return [message]
    messages: list = [None] * dist.get_world_size()
    dist.all_gather_object(messages, message)
    return messages


def barrier() -> None:
    if _multi_rank():
        dist.barrier()


def send_object(obj, dst: int) -> None:
    """Point-to-point: a picklable object to global rank `dst` (between nemo_quant's own ranks)."""
    dist.send_object_list([obj], dst=dst)


def recv_object(src: int):
    box = [None]
    dist.recv_object_list(box, src=src)
    return box[0]
