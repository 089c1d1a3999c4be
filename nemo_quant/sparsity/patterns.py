"""n:m patterns along the input dim: the pure-torch reference every method and check uses."""
from __future__ import annotations

import torch


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest `scores` of every m consecutive columns of each row.

    An element's rank in its group is how many others beat it (higher score, or equal score
    in a lower column): a fixed set of comparisons, so ties decide identically on every rank
    and layout, and cheaper than sorting groups of 4 or 8."""
    rows, cols = scores.shape
    g = scores.reshape(rows, cols // m, m)
    rank = torch.zeros(g.shape, dtype=torch.int8 if m < 128 else torch.int16)
    for j in range(m):
        other = g[..., j:j + 1]
        beats = other > g
        beats[..., j + 1:] |= other.eq(g[..., j + 1:])  # an equal score in a lower column wins the tie
        rank += beats
    return (rank < n).reshape(rows, cols)


def pattern_violations(t: torch.Tensor, n: int, m: int) -> int:
    """How many groups of m along the last dim hold more than n nonzeros (0 = valid n:m)."""
    flat = t.reshape(-1, t.shape[-1])
    if flat.shape[-1] % m:
        raise ValueError(f"the input dim {flat.shape[-1]} is not a multiple of m={m}")
    nonzero = (flat != 0).reshape(flat.shape[0], -1, m).sum(dim=-1)
    return int((nonzero > n).sum())


def magnitude_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return nm_mask(weight.abs(), n, m)


def revived_weights(weight: torch.Tensor, mask: torch.Tensor) -> int:
    """How many weights are nonzero where `mask` prunes them (0 = the mask holds)."""
    return int((weight.detach()[~mask] != 0).sum())
