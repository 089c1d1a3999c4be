"""Sums whose rounding does not depend on the machine: same bits at any thread count.

`torch.sum` of a large tensor splits the work over threads, and how it splits depends on
the thread count (a TP=1 process on 2 threads and a torchrun rank on 1 thread get different
low bits). A search that compares such sums can then pick a different candidate on a
different layout. `fixed_order_sum` accumulates in float64 strictly left to right (a scan is
sequential by construction), so the result is a function of the values alone.
"""
from __future__ import annotations

import torch


def fixed_order_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of every element of `t` as a float64 scalar, accumulated in index order."""
    flat = t.reshape(-1)
    if flat.numel() == 0:
        return torch.zeros((), dtype=torch.float64)
    return flat.cumsum(0, dtype=torch.float64)[-1]
