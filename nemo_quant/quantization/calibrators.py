"""Calibrators: turn the tensors a quantizer sees into its amax.

`reduce_amax(x)` (given by the quantizer) maps a tensor to |x| maxima of the amax's shape.
- max: running maximum of those maxima.
- percentile (per-tensor): the given percentile of |x| over everything seen, from a
  2048-bin histogram that is re-binned when the range grows.
- batch_percentile: the given percentile of the per-batch maxima.
- mse: the amax (a fraction of the max) with the least fake-quant squared error; per-tensor
  from the histogram, per-channel/per-block directly on the last tensor (weights).
"""
from __future__ import annotations

from typing import Callable

import torch

HIST_BINS = 2048
MSE_CANDIDATES = torch.linspace(0.3, 1.0, 71)


class MaxCalibrator:
    def __init__(self, reduce_amax: Callable[[torch.Tensor], torch.Tensor]):
        self.reduce_amax = reduce_amax
        self.amax: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        a = self.reduce_amax(x.detach()).float()
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)

    def compute_amax(self) -> torch.Tensor | None:
        return self.amax


class BatchPercentileCalibrator:
    """amax = the given percentile of the per-batch maxima (each forward call is one batch).

    One outlier batch then cannot set the range (the "percentile quant" of diffusion PTQ,
    over calibration steps). Under TP the per-batch maxima of split statistics are reduced
    first; under DP every rank's maxima join one pool, so all ranks compute the same amax."""

    def __init__(self, reduce_amax: Callable[[torch.Tensor], torch.Tensor], percentile: float,
                 tp_reduce: Callable[[torch.Tensor, str], torch.Tensor] | None,
                 gather_rows: Callable[[torch.Tensor], torch.Tensor]):
        self.reduce_amax, self.percentile = reduce_amax, percentile
        self.tp_reduce, self.gather_rows = tp_reduce or (lambda t, op: t), gather_rows
        self.maxima: list[torch.Tensor] = []

    def collect(self, x: torch.Tensor) -> None:
        self.maxima.append(self.reduce_amax(x.detach()).float())

    def compute_amax(self) -> torch.Tensor | None:
        local = torch.stack(self.maxima) if self.maxima else torch.zeros(0)
        if self.maxima:
            local = self.tp_reduce(local, "max")
        pooled = self.gather_rows(local)
        if pooled.numel() == 0:
            return None
        return torch.quantile(pooled.reshape(pooled.shape[0], -1), self.percentile / 100.0, dim=0).reshape(pooled.shape[1:])


class _Histogram:
    def __init__(self):
        self.counts: torch.Tensor | None = None
        self.top = 0.0

    def add(self, x: torch.Tensor) -> None:
        mags = x.detach().abs().float().reshape(-1)
        top = float(mags.max()) if mags.numel() else 0.0
        if self.counts is None:
            self.top = max(top, 1e-12)
            self.counts = torch.zeros(HIST_BINS, dtype=torch.float64)
        elif top > self.top:
            # Re-bin the old counts at their bin centres into the wider range.
            centres = (torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) * self.top / HIST_BINS
            idx = (centres / top * HIST_BINS).long().clamp(max=HIST_BINS - 1)
            counts = torch.zeros(HIST_BINS, dtype=torch.float64).index_add_(0, idx, self.counts)
            self.counts, self.top = counts, top
        self.counts += torch.histc(mags.double(), bins=HIST_BINS, min=0.0, max=self.top)

    def centres(self) -> torch.Tensor:
        return (torch.arange(HIST_BINS, dtype=torch.float64) + 0.5) * self.top / HIST_BINS


class PercentileCalibrator:
    def __init__(self, percentile: float):
        self.percentile = percentile
        self.hist = _Histogram()

    def collect(self, x: torch.Tensor) -> None:
        self.hist.add(x)

    def compute_amax(self) -> torch.Tensor | None:
        if self.hist.counts is None:
            return None
        cdf = self.hist.counts.cumsum(0) / self.hist.counts.sum()
        idx = int(torch.searchsorted(cdf, torch.tensor(self.percentile / 100.0, dtype=torch.float64)).clamp(max=HIST_BINS - 1))
        return torch.tensor((idx + 1) * self.hist.top / HIST_BINS, dtype=torch.float32)


class MseCalibrator:
    """`quant_error(x, amax)` returns the fake-quant squared error, summed to amax's shape."""

    def __init__(self, reduce_amax, quant_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], per_tensor: bool):
        # It is given whole tensors (TP-gathered where split), never pieces to reduce over TP.
        self.reduce_amax, self.quant_error, self.per_tensor = reduce_amax, quant_error, per_tensor
        self.hist = _Histogram()
        self.last: torch.Tensor | None = None

    def collect(self, x: torch.Tensor) -> None:
        if self.per_tensor:
            self.hist.add(x)
        else:
            self.last = x.detach()

    def compute_amax(self) -> torch.Tensor | None:
        if self.per_tensor:
            if self.hist.counts is None:
                return None
            values, weights = self.hist.centres().float(), self.hist.counts.float()
            errors = torch.stack([
                (self.quant_error(values, torch.tensor(float(r) * self.hist.top)) * weights).sum() for r in MSE_CANDIDATES
            ])
            return torch.tensor(float(MSE_CANDIDATES[int(errors.argmin())]) * self.hist.top)
        if self.last is None:
            return None
        top = self.reduce_amax(self.last).float()
        errors = torch.stack([self.quant_error(self.last, top * r) for r in MSE_CANDIDATES])
        best = MSE_CANDIDATES[errors.argmin(dim=0)]
        return top * best
