"""Calibration forward loops built from token windows (DP-sharded, with a progress bar)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nemo_quant.runtime.pipeline import forward_batches
from nemo_quant.utils.progress import progress


def windows_forward_loop(windows: torch.Tensor, batch_size: int = 1, desc: str = "calibrate") -> Callable[[nn.Module], None]:
    """Each data-parallel rank runs its share of `windows` (every window is seen once in total)."""

    def loop(model: nn.Module) -> None:
        from megatron.core import parallel_state as ps

        mine = windows[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
        batches = list(mine.split(batch_size)) if mine.shape[0] else []  # a DP rank may get no window
        bar = progress(total=len(batches), desc=desc, unit="batch")
        for batch in batches:
            forward_batches(model, [batch], lambda output, tokens: None, num_batches=1)
            bar.update(1)
        bar.close()

    return loop
