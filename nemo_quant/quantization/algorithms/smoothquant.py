"""SmoothQuant: migrate activation outliers into the weights, strength searched per layer.

s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha) divides input channel j and multiplies the
weight column; alpha is chosen per layer from a grid by the output error (not one global
value), and "no smoothing" is always a candidate, so a layer never gets worse than plain max
calibration on the sampled tokens.
"""
from __future__ import annotations

import torch

from nemo_quant.quantization.algorithms.linear_view import LinearView
from nemo_quant.quantization.algorithms.observe import LinearObserver
from nemo_quant.quantization.algorithms.scale_search import alphas

SCALE_RANGE = (1e-4, 1e4)


def smoothquant_candidates(view: LinearView, obs: LinearObserver, grid: int) -> list[tuple[float, torch.Tensor]]:
    act = obs.absmax.clamp(min=1e-5)
    wmax = view.weight.abs().amax(dim=0).clamp(min=1e-5)
    out = []
    for alpha in alphas(grid):
        s = act.pow(alpha) / wmax.pow(1 - alpha)
        out.append((alpha, (1.0 / s).clamp(*SCALE_RANGE)))
    return out
