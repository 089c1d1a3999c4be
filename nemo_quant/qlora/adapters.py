"""LoRA adapters on a TP-sharded Megatron linear layer, split the way the engines expect.

One adapter per Hugging Face tensor, as PEFT has it: a fused layer with P parts (q, k, v or
gate, up) holds A = [A_q; A_k; A_v] ([P*r, in]) and B [out, r] whose rows follow the weight's
(each row uses the r columns of its own part's A-output).
Column-parallel (qkv, fc1): A [P*r, in] replicated, B [out/TP, r] split with the weight's rows.
    delta_r = B_r (A x): the A-output passes `copy_to_tensor_model_parallel_region`, whose
    backward all-reduces dL/d(Ax) over TP, so A's gradient is the full one on every rank.
Row-parallel (proj, fc2): A [r, in/TP] split with the weight's columns, B [out, r] replicated.
    delta = B allreduce(A_r x_r): `reduce_from_tensor_model_parallel_region` sums the partial
    A-outputs in the forward and passes gradients through, so B's gradient is the full one.
Every rank draws the full TP=1 matrices from the same seed and keeps its share, so adapters
start identical at any layout; dropout masks come from a counter-based seed (saved with the
checkpoint), so they are the same on every TP rank and a resumed run draws the same ones.
"""
from __future__ import annotations

import math

import torch
from torch import nn

DROPOUT_CALLS = "lora_dropout_calls"


def standard_init(rank: int, out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's default: A ~ Kaiming-uniform(a=sqrt(5)) (nn.Linear's init), B = 0."""
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_ with a = sqrt(5)
    a = (torch.rand(rank, in_features, generator=gen, dtype=torch.float64) * 2 - 1) * bound
    return a.float(), torch.zeros(out_features, rank)


def residual_init(residual: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A, B with scaling * B A = the best rank-r approximation of `residual` (LoftQ's step)."""
    u, s, vh = torch.linalg.svd(residual.double(), full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root / math.sqrt(scaling)
    a = root[:, None] * vh[:rank] / math.sqrt(scaling)
    return a.float(), b.float()


def install_adapters(module: nn.Module, a_full: torch.Tensor, b_full: torch.Tensor, part_of_row: torch.Tensor,
                     view, dtype: torch.dtype, device: torch.device) -> None:
    """Keep this rank's share of the full (TP=1 layout) A [P*r, in] and B [out, r] as trainable
    parameters; `part_of_row` [out] names each full row's part."""
    a = view.local_columns(a_full) if view.row_parallel else a_full
    b = b_full if view.row_parallel else view.local_rows(b_full)
    module.lora_A = nn.Parameter(a.to(device=device, dtype=dtype).contiguous())
    module.lora_B = nn.Parameter(b.to(device=device, dtype=dtype).contiguous())
    module.register_buffer(DROPOUT_CALLS, torch.zeros((), dtype=torch.int64, device=device))
    local_parts = part_of_row if view.row_parallel else view.local_rows(part_of_row)
    parts = int(part_of_row.max()) + 1
    module._nq_lora_parts = parts
    module.register_buffer("_nq_lora_part_of_row", local_parts.to(device=device, dtype=torch.long), persistent=False)
    module.register_buffer("_nq_lora_rows", torch.arange(local_parts.numel(), device=device), persistent=False)


def _dropout(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    p = module._nq_lora_dropout
    if p == 0 or not module.training:
        return x
    calls = getattr(module, DROPOUT_CALLS)
    gen = torch.Generator(device=x.device).manual_seed(module._nq_lora_seed * 1_000_003 + int(calls))
    calls += 1
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p
    return x * keep / (1 - p)


def lora_delta(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """scaling * B A dropout(x) for this rank's output (see the module docstring for TP)."""
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region, reduce_from_tensor_model_parallel_region,
    )

    a, b = module.lora_A, module.lora_B
    # the scaling multiplies the rank-r A-output, not the (much wider) layer output
    h = nn.functional.linear(_dropout(module, x).to(a.dtype), a) * module._nq_lora_scaling
    if module._nq_weight_tp_axis == 1:
        h = reduce_from_tensor_model_parallel_region(h, group=module.tp_group)
    else:
        h = copy_to_tensor_model_parallel_region(h, group=module.tp_group)
    parts = module._nq_lora_parts
    if parts > 1:
        # Row i reads the r columns of its own part: B as a block-diagonal [out, P*r] (built from
        # B, so gradients reach B only), one GEMM whose output is already in the layer's row order.
        rows = module._nq_lora_rows
        b = b.new_zeros(b.shape[0], parts, b.shape[1]).index_put((rows, module._nq_lora_part_of_row), b)
        b = b.reshape(b.shape[0], -1)
    return nn.functional.linear(h, b)
