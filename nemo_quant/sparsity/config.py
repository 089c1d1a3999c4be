"""Typed configuration of the sparsity mode (Hydra group `sparsity`, presets in conf/sparsity/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class SparsityMethod(str, Enum):
    magnitude = "magnitude"  # keep the n largest |w| of every m; no data
    sparsegpt = "sparsegpt"  # OBS mask selection with weight reconstruction, block by block
    admm = "admm"  # SparseGPT start, ADMM support search, least-squares refit on the support


@dataclass
class AdmmConfig:
    """ADMM support search + refit (sparsity.admm), ALPS-style."""

    iterations: int = 10  # ADMM steps; 0 = keep SparseGPT's support and only refit
    rho_start: float = 0.03  # penalty, relative to the mean diagonal of the damped Hessian
    rho_growth: float = 1.6  # penalty multiplier per step (a geometric schedule)
    refit_iterations: int = 15  # preconditioned conjugate-gradient steps on the fixed support


@dataclass
class SparsityConfig:
    name: str = "admm"
    method: SparsityMethod = SparsityMethod.admm
    n: int = 2  # nonzeros kept ...
    m: int = 4  # ... in every group of m consecutive inputs of a weight row
    # fnmatch patterns on module names (decoder layer numbers counted over the whole pipeline)
    # of the Column/RowParallelLinear layers left dense; each must match at least one layer.
    # The output layer shares its weight with the embedding in tied models: keep it dense.
    exclude: list[str] = field(default_factory=lambda: ["output_layer"])
    damp: float = 0.01  # Hessian damping, a fraction of its mean diagonal (SparseGPT, ADMM)
    block_size: int = 128  # SparseGPT's lazy-update column block (a multiple of m)
    admm: AdmmConfig = field(default_factory=AdmmConfig)
