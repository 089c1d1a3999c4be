"""Choosing a per-input-channel pre-quant scale by the layer's output error (SmoothQuant, AWQ).

A candidate scale p makes the layer compute Q_a(x * p) @ Q_w(W / p)^T; its error is the
squared difference to the unquantized x @ W^T on the sampled calibration tokens, with the
weight max-calibrated after scaling and the input quantized as its per-tensor max quantizer
would (amax = max_j of max|x_j| * p_j over the whole calibration set). Every rank computes
the errors of the whole layer in a fixed order (TP=1's computation, see linear_view), then
sums them over DP (different tokens), so every rank picks the candidate TP=1 picks.
"""
from __future__ import annotations

import torch

from nemo_quant.distributed import dp_all_reduce
from nemo_quant.numerics.fixed_order import fixed_order_sum
from nemo_quant.quantization.algorithms.linear_view import LinearView
from nemo_quant.quantization.algorithms.observe import LinearObserver


def output_errors(view: LinearView, obs: LinearObserver, candidates: list[torch.Tensor]) -> torch.Tensor:
    x = obs.sample_rows()
    w = view.weight
    reference = x @ w.T
    errors = []
    for p in candidates:
        scaled = w / p
        wq = view.quant_weight(scaled, view.weight_amax(scaled))
        xq = view.quant_input(x * p, obs.absmax * p)
        errors.append(fixed_order_sum((xq @ wq.T - reference).pow(2)))
    return dp_all_reduce(torch.stack(errors), "sum")


def best_scale(view: LinearView, obs: LinearObserver, candidates: list[tuple[float, torch.Tensor]]):
    """(alpha, scale) of the candidate with the least output error; alpha None = no scaling."""
    options = [(None, torch.ones_like(obs.absmax))] + candidates
    errors = output_errors(view, obs, [p for _, p in options])
    return options[int(errors.argmin())]


def alphas(grid: int) -> list[float]:
    return [i / grid for i in range(grid + 1)]
