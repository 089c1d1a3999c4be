"""AWQ: protect salient input channels (scale search) and clip weight ranges (clip search).

Scale search (awq_lite): s_j = mean|x_j|^alpha / mean_i(|W_ij| / groupmax_i)^(1 - alpha),
normalised so that sqrt(max s * min s) = 1; alpha per layer by output error, identity always
a candidate. Clip search (awq_clip): per output row and weight block, the amax ratio r in
[clip_min, 1] with the least error e = d H_b d^T, where d is the block's rounding error and
H_b the block's diagonal block of X^T X over all calibration tokens (in the scaled basis).
Blocks are independent, so the per-block choice is exact for that error. Ragged last blocks
are zero-padded on both sides, which adds nothing to e.
"""
from __future__ import annotations

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks
from nemo_quant.numerics.fixed_order import fixed_order_sum
from nemo_quant.quantization.algorithms.linear_view import LinearView
from nemo_quant.quantization.algorithms.observe import LinearObserver
from nemo_quant.quantization.algorithms.scale_search import alphas

SCALE_RANGE = (1e-4, 1e4)


def awq_candidates(view: LinearView, obs: LinearObserver, grid: int) -> list[tuple[float, torch.Tensor]]:
    w = view.weight.abs()
    bs = view.weight_block()
    blocks = to_blocks(w, bs)
    normalised = from_blocks(blocks / blocks.amax(dim=-1, keepdim=True).clamp(min=1e-12), w.shape[1])
    wmean = normalised.sum(dim=0) / w.shape[0]
    act = obs.absmean.clamp(min=1e-4)
    out = []
    for alpha in alphas(grid):
        s = act.pow(alpha) / wmean.clamp(min=1e-4).pow(1 - alpha)
        s = s / (s.max() * s.min()).sqrt()
        out.append((alpha, (1.0 / s).clamp(*SCALE_RANGE)))
    return out


def clip_ratios(grid: int, clip_min: float) -> list[float]:
    return [1.0 - i * (1.0 - clip_min) / grid for i in range(grid + 1)]


def awq_clip(view: LinearView, obs: LinearObserver, scale: torch.Tensor, grid: int, clip_min: float) -> torch.Tensor:
    """The weight amax (quantizer buffer shape) after the clip search, for weights W / scale."""
    w = view.weight / scale
    bs = obs.block_size
    p = to_blocks(scale.unsqueeze(0), bs)[0]  # [blocks, bs], zero-padded
    hessian = obs.block_hessian * p.unsqueeze(2) * p.unsqueeze(1)
    base = view.weight_amax(w)
    best_amax, best_err = base.clone(), None
    for r in clip_ratios(grid, clip_min):
        amax = base * r
        d = to_blocks(view.quant_weight(w, amax) - w, bs)  # [rows, blocks, bs]
        err = torch.einsum("rbi,bij,rbj->rb", d, hessian, d)
        if base.ndim == 0:  # one amax for the whole tensor: total error over every row
            err = fixed_order_sum(err)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_amax = torch.where(better.reshape(best_amax.shape), amax, best_amax)
    return best_amax
