"""One layer's n:m pruning given its weight W0 [rows, in] and input Hessian H = X^T X.

Every method minimises (or approximates) the layer's output error
    E(W) = trace((W - W0) H (W - W0)^T)   over W with an n:m pattern along the input dim.
- `magnitude`: no data.
- `sparsegpt`: OBS sweep; at every m-th column the group's mask is chosen by w^2 / [H^-1]_jj^2
  and the pruned weights' error is pushed onto the columns to the right (weights kept).
- `admm`: starts from SparseGPT, searches the support with ADMM (W = D split: a ridge step
  toward W0 under H, a projection onto n:m, a dual step; penalty grows geometrically, as in
  ALPS), then refits the kept weights by least squares on the fixed support (preconditioned
  conjugate gradients, all rows at once). The result with the lower E among it and
  SparseGPT's is returned, so it is never worse than SparseGPT on the same H.
All work is on the whole (TP-gathered) layer, so every rank computes TP=1's answer.
"""
from __future__ import annotations

import torch

from nemo_quant.numerics.obs_sweep import damped_hessian, inverse_factor, obs_sweep
from nemo_quant.sparsity.config import AdmmConfig
from nemo_quant.sparsity.patterns import magnitude_mask, nm_mask


def layer_error(w: torch.Tensor, w0: torch.Tensor, h: torch.Tensor) -> float:
    """E(W) = trace((W - W0) H (W - W0)^T), in float64."""
    d = (w.double() - w0.double())
    return float(((d @ h.double()) * d).sum())


def magnitude(w0: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    mask = magnitude_mask(w0, n, m)
    return w0 * mask, mask


def sparsegpt(w0: torch.Tensor, hessian: torch.Tensor, n: int, m: int, damp: float,
              block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(reconstructed weights, mask), float32 weights."""
    if block_size % m:
        raise ValueError(f"sparsity.block_size={block_size} must be a multiple of sparsity.m={m}")
    w, h = damped_hessian(w0, hessian, damp)
    mask = torch.zeros(w.shape, dtype=torch.bool)

    def rule(block: torch.Tensor, i: int, start: int, u_block: torch.Tensor) -> torch.Tensor:
        j = start + i
        if i % m == 0:
            scores = block[:, i:i + m] ** 2 / torch.diagonal(u_block)[i:i + m].unsqueeze(0) ** 2
            mask[:, j:j + m] = nm_mask(scores, n, m)
        return block[:, i] * mask[:, j]

    q = obs_sweep(w, inverse_factor(h), block_size, rule)
    return q.float(), mask


def admm(w0: torch.Tensor, hessian: torch.Tensor, n: int, m: int, damp: float, block_size: int,
         cfg: AdmmConfig) -> tuple[torch.Tensor, torch.Tensor]:
    start_w, start_mask = sparsegpt(w0, hessian, n, m, damp, block_size)
    w0d, h = damped_hessian(w0, hessian, damp)
    h32, w0f = h.float(), w0d.float()
    mask = _admm_support(w0f, h32, start_w, n, m, cfg) if cfg.iterations > 0 else start_mask
    refit = refit_on_support(w0f, h32, mask, start_w * mask, cfg.refit_iterations)
    if layer_error(refit, w0d, h) <= layer_error(start_w, w0d, h):
        return refit, mask
    return start_w, start_mask


def _admm_support(w0: torch.Tensor, h: torch.Tensor, start: torch.Tensor, n: int, m: int,
                  cfg: AdmmConfig) -> torch.Tensor:
    """The n:m support ADMM settles on, started at D = `start`."""
    lam, q = torch.linalg.eigh(h)
    b = w0 @ h  # W0 H: the data term of the ridge step
    rho = cfg.rho_start * float(torch.diagonal(h).mean())
    d, v = start.clone(), torch.zeros_like(start)
    mask = start != 0
    for _ in range(cfg.iterations):
        # W = (W0 H + rho (D - V)) (H + rho I)^-1, through H's eigenbasis.
        w = ((b + rho * (d - v)) @ q / (lam + rho)) @ q.T
        mask = nm_mask((w + v).abs(), n, m)
        d = (w + v) * mask
        v += w - d
        rho *= cfg.rho_growth
    return mask


def refit_on_support(w0: torch.Tensor, h: torch.Tensor, mask: torch.Tensor, start: torch.Tensor,
                     iterations: int) -> torch.Tensor:
    """argmin E(W) over W supported on `mask`: solves (W H)|S = (W0 H)|S row by row with Jacobi-
    preconditioned conjugate gradients (every row at once; each step lowers E)."""
    maskf = mask.float()
    w = start.float() * maskf
    r = (w0 @ h - w @ h) * maskf  # residual of the normal equations on the support
    precond = 1.0 / torch.diagonal(h).clamp(min=torch.finfo(h.dtype).tiny)
    z = r * precond
    p = z.clone()
    rz = (r * z).sum(dim=1, keepdim=True)
    for _ in range(iterations):
        ap = (p @ h) * maskf
        denom = (p * ap).sum(dim=1, keepdim=True)
        alpha = torch.where(denom > 0, rz / denom.clamp(min=torch.finfo(h.dtype).tiny), torch.zeros_like(rz))
        w = w + alpha * p
        r = r - alpha * ap
        z = r * precond
        rz_new = (r * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp(min=torch.finfo(h.dtype).tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
    return w * maskf
