"""Tensor-parallel GEMMs whose result does not depend on the TP layout (calibration forwards).

fp32 GEMMs round differently when their shapes differ: a row-parallel layer at TP=t adds t
partial products (all-reduce) where TP=1 runs one GEMM over the whole input dim, and even a
column-parallel layer's [M, K] x [K, N/t] GEMM can round an output element differently from
the [M, K] x [K, N] one (the BLAS picks its kernel by shape). A calibration search
downstream can then decide differently on a real model.

Inside `canonical_gemms(model)` the linear layers of the decoder compute in C canonical
shards, the same at every layout: C = gcd(heads, query groups, FFN size), the largest TP
Megatron admits, so a rank at TP=t owns C/t whole shards, and a shard is what rank c would
hold at TP=C (megatron_layout's rules: q/k/v groups; gate_c and up_c for gated fc1).
- column parallel: one GEMM per output shard (gate and up shards apart for gated fc1);
- row parallel: one GEMM per input shard, added strictly in shard order: a left fold over
  rank 0's shards that passes its running sum to rank 1, and so on; the last rank
  broadcasts the result (t - 1 point-to-point hops instead of one all-reduce).
- the MLP activation (SiLU of SwiGLU, GELU, ...) runs per shard on contiguous 2-D pieces:
  torch's vectorised transcendental kernels round differently from their scalar tail loop,
  and which elements fall in the tail depends on the row length, i.e. on TP.
GEMMs of equal shapes, element-wise adds and these activations are deterministic, so every
activation is bit-identical at TP=1, 2, 3, ... Forward-only: calibration runs under no_grad.
(Megatron's fused bias-activation kernels, GPU only, are not intercepted.)
"""
from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def canonical_shards(config) -> int:
    """C for a Megatron TransformerConfig: the largest TP the model admits."""
    heads = config.num_attention_heads
    groups = config.num_query_groups or heads
    return math.gcd(math.gcd(heads, groups), config.ffn_hidden_size)


def _tp(module: nn.Module) -> tuple[int, int]:
    group = module.tp_group
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _operands(module: nn.Module, x: torch.Tensor, w: torch.Tensor):
    if torch.is_grad_enabled():
        raise RuntimeError("canonical GEMMs are for calibration forwards (no_grad) only")
    return module.gemm_operands(x, w) if hasattr(module, "gemm_operands") else (x, w)


def _local_shards(module: nn.Module, dim_size: int, what: str) -> int:
    """How many canonical shards this rank holds of a dim of `dim_size` local elements."""
    _, tp = _tp(module)
    shards = canonical_shards(module.config)
    if shards % tp or dim_size % (shards // tp):
        raise ValueError(f"{type(module).__name__}: the {what} dim ({dim_size} per rank at TP={tp}) does not split "
                         f"into {shards} canonical shards")
    return shards // tp


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w^T on canonical 2-D operands: the BLAS path also depends on strides (a size-1 batch
    dim with another stride took a different kernel and rounded differently)."""
    y = F.linear(x.reshape(-1, x.shape[-1]).contiguous(), w.contiguous())
    return y.view(*x.shape[:-1], w.shape[0])


def _canonical_activation(act, shards_per_rank: int):
    def activation(x: torch.Tensor) -> torch.Tensor:
        pieces = x.chunk(shards_per_rank, dim=-1)
        return torch.cat([act(p.reshape(-1, p.shape[-1]).contiguous()).view(p.shape) for p in pieces], dim=-1)

    activation.canonical_of = act
    return activation


def _column_forward_impl(self: nn.Module, input, weight, bias=None, *, gated: bool, **_):
    x, w = _operands(self, input, weight)
    k = _local_shards(self, w.shape[0], "output")
    # Gated fc1 holds [gate_r; up_r]: 2k row pieces (gate's k shards, then up's), each a
    # contiguous block at every layout; the outputs concatenate back into the same layout.
    pieces = w.chunk(2 * k if gated else k, dim=0)
    out = torch.cat([_gemm(x, p) for p in pieces], dim=-1)
    return out if bias is None else out + bias


def _row_forward(self: nn.Module, input_: torch.Tensor):
    if not self.input_is_parallel or self.sequence_parallel or self.explicit_expert_comm:
        raise NotImplementedError(f"{type(self).__name__}: canonical GEMMs need input_is_parallel=True without "
                                  "sequence parallelism or expert communication")
    x, w = _operands(self, input_, self.weight)
    k = _local_shards(self, x.shape[-1], "input")
    width = x.shape[-1] // k
    # Every rank computes its shard products first (in parallel), then folds them in order.
    parts = [_gemm(x[..., j * width:(j + 1) * width], w[:, j * width:(j + 1) * width]) for j in range(k)]
    rank, tp = _tp(self)
    total = None
    if rank > 0:
        total = torch.empty_like(parts[0])
        dist.recv(total, src=dist.get_global_rank(self.tp_group, rank - 1), group=self.tp_group)
    for part in parts:
        total = part if total is None else total + part
    if tp > 1:
        if rank < tp - 1:
            dist.send(total, dst=dist.get_global_rank(self.tp_group, rank + 1), group=self.tp_group)
        dist.broadcast(total, src=dist.get_global_rank(self.tp_group, tp - 1), group=self.tp_group)
    if self.skip_bias_add:
        return total, self.bias
    return (total + self.bias if self.bias is not None else total), None


class canonical_gemms:
    """Context: the decoder's linear layers and MLP activations of `model` compute in canonical shards."""

    def __init__(self, model: nn.Module):
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLP

        decoder = getattr(model, "decoder", None)
        self.methods, self.mlps = [], []
        for name, module in (decoder.named_modules() if decoder is not None else []):
            if isinstance(module, RowParallelLinear):
                self.methods.append((module, "forward", functools.partial(_row_forward, module)))
            elif isinstance(module, ColumnParallelLinear):
                gated = name.endswith("mlp.linear_fc1") and bool(module.config.gated_linear_unit)
                self.methods.append((module, "_forward_impl", functools.partial(_column_forward_impl, module, gated=gated)))
            elif isinstance(module, MLP):
                self.mlps.append(module)
        # A gated MLP calls config.activation_func inside its forward; others their own attribute.
        self.configs = list({id(m.config): m.config for m in self.mlps if m.config.gated_linear_unit}.values())

    def __enter__(self):
        for module, attr, fn in self.methods:
            setattr(module, attr, fn)
        gated_shards = {}
        for mlp in self.mlps:
            k = _local_shards(mlp.linear_fc1, mlp.linear_fc2.input_size_per_partition, "FFN")
            if mlp.config.gated_linear_unit:
                gated_shards[id(mlp.config)] = k
            else:
                mlp.activation_func = _canonical_activation(mlp.activation_func, k)
        for config in self.configs:
            config.activation_func = _canonical_activation(config.activation_func, gated_shards[id(config)])
        return self

    def __exit__(self, *exc):
        for module, attr, _ in self.methods:
            delattr(module, attr)
        for mlp in self.mlps:
            if not mlp.config.gated_linear_unit:
                mlp.activation_func = mlp.activation_func.canonical_of
        for config in self.configs:
            config.activation_func = config.activation_func.canonical_of
