"""Row-parallel GEMMs whose fp32 result does not depend on the TP layout (calibration only).

A row-parallel layer at TP=t computes a partial product per rank and all-reduces them; at
TP=1 it is one GEMM over the whole input dim. The two round differently (last bits), and a
calibration search downstream can then decide differently on a real model. Inside
`ordered_row_parallel_sums(model)` every row-parallel layer instead splits its input dim into
the same C canonical shards at every layout (C = gcd(heads, query groups, FFN size): every TP
Megatron accepts divides it, so a rank owns C/t whole shards), computes one GEMM per shard and
adds the shard products strictly in shard order: a left fold that runs on rank 0's shards,
passes its running sum to rank 1, and so on; the last rank broadcasts the result. GEMMs of
equal shapes and element-wise adds are deterministic (at any thread count), so the output is
bit-identical at TP=1, 2, 3, ... Costs: C smaller GEMMs instead of one, t - 1 point-to-point
hops instead of an all-reduce; forward-only (calibration runs under no_grad).
"""
from __future__ import annotations

import math
import types

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def canonical_shards(config) -> int:
    """C for a Megatron TransformerConfig: the largest TP the model admits."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    return math.gcd(math.gcd(heads, groups), config.ffn_hidden_size)


def _row_parallel_layers(model: nn.Module) -> list[nn.Module]:
    from megatron.core.tensor_parallel.layers import RowParallelLinear

    return [m for m in model.modules() if isinstance(m, RowParallelLinear)]


def _tp(module: nn.Module) -> tuple[int, int]:
    group = module.tp_group
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _ordered_forward(self: nn.Module, input_: torch.Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError("ordered row-parallel sums are for calibration forwards (no_grad) only")
    if not self.input_is_parallel or self.sequence_parallel or self.explicit_expert_comm:
        raise NotImplementedError(f"{type(self).__name__}: ordered sums need input_is_parallel=True without "
                                  "sequence parallelism or expert communication")
    x, w = self.gemm_operands(input_, self.weight) if hasattr(self, "gemm_operands") else (input_, self.weight)
    rank, tp = _tp(self)
    shards = canonical_shards(self.config)
    if shards % tp or x.shape[-1] % (shards // tp):
        raise ValueError(f"{type(self).__name__}: input dim {self.input_size} at TP={tp} cannot be split into "
                         f"{shards} canonical shards")
    width = x.shape[-1] // (shards // tp)
    # Every rank computes its shard products first (in parallel), then folds them in order.
    parts = [F.linear(x[..., i * width:(i + 1) * width].contiguous(), w[:, i * width:(i + 1) * width].contiguous())
             for i in range(shards // tp)]
    total = None
    if rank > 0:
        total = torch.empty_like(parts[0])
        dist.recv(total, src=dist.get_global_rank(self.tp_group, rank - 1), group=self.tp_group)
    for part in parts:
        total = part if total is None else total + part
    if tp > 1:
        last = dist.get_global_rank(self.tp_group, tp - 1)
        if rank < tp - 1:
            dist.send(total, dst=dist.get_global_rank(self.tp_group, rank + 1), group=self.tp_group)
        dist.broadcast(total, src=last, group=self.tp_group)
    if self.skip_bias_add:
        return total, self.bias
    return (total + self.bias if self.bias is not None else total), None


class ordered_row_parallel_sums:
    """Context: every row-parallel layer of `model` adds its shard products in canonical order."""

    def __init__(self, model: nn.Module):
        self.layers = _row_parallel_layers(model)

    def __enter__(self):
        for layer in self.layers:
            layer.forward = types.MethodType(_ordered_forward, layer)
        return self

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer.forward
