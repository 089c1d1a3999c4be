"""`calibrate(model, forward_loop)`: collect statistics, compute and synchronise scales."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nemo_quant.distributed import any_rank, sync_amax
from nemo_quant.modes import mode_config
from nemo_quant.quantization.algorithms import run_algorithm, uses_algorithm
from nemo_quant.quantization.algorithms.observe import gather_input_dim, gather_output_dim, is_row_parallel
from nemo_quant.quantization.forward_loop import CalibrationError, run_forward_loop_everywhere
from nemo_quant.quantization.modules import QuantLinearMixin, quantizers


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], None] | None) -> None:
    """Calibrate every quantizer of `model` that needs it.

    The quantize mode's algorithm (SmoothQuant, AWQ, GPTQ) runs first and sets the scales it
    decides. Other weight quantizers are calibrated from the weights themselves (no data
    needed); input and KV quantizers from what `forward_loop(model)` pushes through them. Scales are then
    synchronised across ranks; a quantizer that saw no data on any rank is an error.
    """
    cfg = mode_config(model, "quantize")
    done: set[int] = set()
    if cfg is not None and uses_algorithm(cfg):
        done = run_algorithm(model, cfg, forward_loop)
    named = [(n, q) for n, q in quantizers(model) if q.needs_calibration and id(q) not in done]
    for _, q in named:
        q.start_calibration()
    try:
        for module in model.modules():
            if isinstance(module, QuantLinearMixin) and module.weight_quantizer is not None:
                wq = module.weight_quantizer
                if wq.calibrating:
                    with torch.no_grad():
                        _collect_weight(module, wq)
                    wq.set_amax(_finish(wq))
        if forward_loop is not None and any_rank(any(q.calibrating for _, q in named)):
            # Decided globally: under PP a stage without data quantizers still has to relay
            # activations for the stages that have them.
            run_forward_loop_everywhere(model, forward_loop)
        missing = []
        for name, q in named:
            if not q.calibrating:
                continue
            amax = _finish(q)
            if not bool(amax.gt(0).any()):
                missing.append(name)
            q.set_amax(amax)
        if missing:
            raise CalibrationError(
                f"{len(missing)} quantizers saw no calibration data on any rank (e.g. {missing[0]}); "
                "check that the forward loop runs the model on data.calib_samples > 0 windows."
            )
    finally:
        for _, q in named:
            q._calibrator = None


def _collect_weight(module: nn.Module, wq) -> None:
    """Percentile / MSE weight calibrators see what TP=1 sees: a row-parallel weight's whole
    rows (partial errors summed over ranks round differently and can tip the search), and a
    per-tensor scale's whole weight (a max of per-rank percentiles is another statistic).
    Per-row scales of a column-parallel layer depend on their own rows only."""
    weight = module.weight.detach()
    if wq.uses_distribution and is_row_parallel(module):
        weight = gather_input_dim(module, weight)
    elif wq.uses_distribution and wq.amax.ndim == 0:
        weight = gather_output_dim(module, weight)
    wq.collect(weight)


def _finish(q) -> torch.Tensor:
    local = q.local_amax()
    amax = torch.zeros(q.amax.shape) if local is None else local.float().reshape(q.amax.shape).clone()
    return sync_amax(amax, q.reduce_over_tp)
