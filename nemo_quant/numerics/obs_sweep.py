"""The Optimal-Brain-Surgeon column sweep shared by GPTQ (rounding) and SparseGPT (pruning).

Columns of a weight are fixed one by one (a caller-given rule decides each column's new
values), and each column's error is pushed onto the columns not yet fixed through the upper
Cholesky factor of the inverse Hessian of the layer's inputs. Columns go in blocks with lazy
batch updates of the remaining columns, as in both papers.
"""
from __future__ import annotations

from typing import Callable

import torch

# (block being swept [rows, b], column index in the block, block's first column, the factor's
# block [b, b]) -> the fixed values of that column [rows]
ColumnRule = Callable[[torch.Tensor, int, int, torch.Tensor], torch.Tensor]


def damped_hessian(w: torch.Tensor, hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 copies of (w, H + damp * mean(diag H) * I); columns whose input never fired get
    weight 0 and a unit diagonal."""
    w = w.double().clone()
    h = hessian.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    return w, h


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1: row i holds how column i's error spreads to columns > i."""
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def obs_sweep(w: torch.Tensor, u: torch.Tensor, block_size: int, rule: ColumnRule) -> torch.Tensor:
    """Fixed weights [rows, cols]; `w` (float64, a working copy) is updated in place."""
    q = torch.zeros_like(w)
    cols = w.shape[1]
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block, u_block = w[:, start:end].clone(), u[start:end, start:end]
        errors = torch.zeros_like(block)
        for i in range(end - start):
            col = block[:, i]
            qcol = rule(block, i, start, u_block)
            q[:, start + i] = qcol
            err = (col - qcol) / u_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ u[start:end, end:]
    return q
