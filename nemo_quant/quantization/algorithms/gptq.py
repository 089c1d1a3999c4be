"""GPTQ: quantize weight columns one by one, pushing each column's rounding error onto the
columns not yet quantized through the inverse Hessian of the layer's inputs.

Scales are fixed before GPTQ starts (max or AWQ-clipped amax, "static groups"), so activation
ordering cannot change which scale a column uses and the quantizer in the model reproduces
the GPTQ result exactly: the weight is replaced by its dequantized values, which round to
themselves (INT grids and FP8 grids alike: a dequantized FP8 value divided by its scale is an
E4M3 value again). Columns are processed in blocks (lazy batch updates, as in the paper); a column
whose input never fired gets weight 0; `damp` times the mean diagonal regularises H.
"""
from __future__ import annotations

from typing import Callable

import torch

from nemo_quant.numerics.fp8 import fake_quant_fp8
from nemo_quant.numerics.obs_sweep import damped_hessian, inverse_factor, obs_sweep
from nemo_quant.numerics.integer import fake_quant_int
from nemo_quant.quantization.config import FP8, INT_BITS, GptqConfig, QFormat

ColumnQuantizer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (column, its amax) -> dequantized


def column_quantizer(fmt: QFormat) -> ColumnQuantizer:
    """Round one weight column on the grid of `fmt` with fixed per-element amax."""
    if fmt in INT_BITS:
        return lambda col, amax: fake_quant_int(col, amax, INT_BITS[fmt])
    if fmt in FP8:
        return lambda col, amax: fake_quant_fp8(col, amax, fmt.value)
    raise ValueError(f"GPTQ has no fixed-scale grid for {fmt.value} weights")


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, amax_per_column: torch.Tensor, quantize: ColumnQuantizer,
                  cfg: GptqConfig, input_scale: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantized weights [rows, cols] for `w` on `quantize`'s grid, given X^T X and every element's amax.

    With a pre-quant scale p (the layer computes (x * p) @ w^T, w already divided by p), the
    problem is solved in the scaled basis, H' = diag(p) H diag(p), but damped in the original
    one: damping H' directly would shrink the regulariser of a channel by p^2, and AWQ gives
    rarely active channels large p, where GPTQ would then park its error for free.

    `keep` (bool [rows, cols]) is a sparsity mask: pruned weights are fixed at 0 and their
    whole value becomes error the remaining columns absorb (joint SparseGPT + GPTQ)."""
    w, h = damped_hessian(w, hessian, cfg.damp)
    amax = amax_per_column.double()
    if input_scale is not None:
        p = input_scale.double()
        h = h * p.unsqueeze(1) * p.unsqueeze(0)
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True) if cfg.act_order else torch.arange(w.shape[1])
    w, h, amax = w[:, perm], h[perm][:, perm], amax[:, perm]
    keep = keep[:, perm] if keep is not None else None

    def rule(block: torch.Tensor, i: int, start: int, u_block: torch.Tensor) -> torch.Tensor:
        q = quantize(block[:, i], amax[:, start + i])
        return q if keep is None else q * keep[:, start + i]

    q = obs_sweep(w, inverse_factor(h), cfg.block_size, rule)
    return q[:, torch.argsort(perm)].float()
