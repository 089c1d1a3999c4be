"""Calibration forward loops: built from token windows (DP-sharded, with a progress bar), and
run on every rank with agreement on failure."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nemo_quant.distributed import gather_messages
from nemo_quant.runtime.canonical_gemms import canonical_gemms
from nemo_quant.runtime.pipeline import data_parallel_batches, forward_batches, logits_skipped
from nemo_quant.utils.progress import progress


class CalibrationError(RuntimeError):
    pass


def run_forward_loop_everywhere(model: nn.Module, forward_loop) -> None:
    """Run the loop, then agree across all ranks on whether any rank failed.

    The decoder's GEMMs run in canonical shards meanwhile, so the activations every statistic
    sees are bit-identical at any TP (runtime/canonical_gemms).

    A rank that raised still joins the agreement, so every rank leaves with an error naming
    the failing rank instead of waiting forever in the statistics sync."""
    was_training = model.training
    model.eval()
    error: BaseException | None = None
    try:
        with torch.no_grad(), canonical_gemms(model):
            forward_loop(model)
    except Exception as exc:  # re-raised below on this rank, reported on the others
        error = exc
    finally:
        model.train(was_training)
    messages = gather_messages(None if error is None else f"{type(error).__name__}: {error}")
    failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
    if error is not None:
        raise error
    if failed:
        rank, msg = failed[0]
        raise CalibrationError(f"calibration failed on rank {rank} ({msg}); no scales were set.")


def windows_forward_loop(windows: torch.Tensor, batch_size: int = 1, desc: str = "calibrate") -> Callable[[nn.Module], None]:
    """Each data-parallel rank runs its share of `windows` (every window is seen once in total)."""

    def loop(model: nn.Module) -> None:
        batches = data_parallel_batches(windows, batch_size)
        bar = progress(total=len(batches), desc=desc, unit="batch")
        with logits_skipped(model):  # the outputs are not used: only the statistics on the way
            for batch in batches:
                forward_batches(model, [batch], lambda output, tokens: None, num_batches=1)
                bar.update(1)
        bar.close()

    loop.windows = windows  # modes that score candidates by their loss (prune) read the tokens too
    return loop
