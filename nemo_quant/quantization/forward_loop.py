"""Calibration forward loops built from token windows (DP-sharded, with a progress bar)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nemo_quant.runtime.pipeline import data_parallel_batches, forward_batches
from nemo_quant.utils.progress import progress


def windows_forward_loop(windows: torch.Tensor, batch_size: int = 1, desc: str = "calibrate") -> Callable[[nn.Module], None]:
    """Each data-parallel rank runs its share of `windows` (every window is seen once in total)."""

    def loop(model: nn.Module) -> None:
        batches = data_parallel_batches(windows, batch_size)
        bar = progress(total=len(batches), desc=desc, unit="batch")
        for batch in batches:
            forward_batches(model, [batch], lambda output, tokens: None, num_batches=1)
            bar.update(1)
        bar.close()

    return loop
