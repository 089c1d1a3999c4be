"""`calibrate(model, forward_loop)`: collect statistics, compute and synchronise scales."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nemo_quant.distributed import sync_amax
from nemo_quant.quantization.modules import QuantLinearMixin, quantizers


class CalibrationError(RuntimeError):
    pass


def calibrate(model: nn.Module, forward_loop: Callable[[nn.Module], None] | None) -> None:
    """Calibrate every quantizer of `model` that needs it.

    Weight quantizers are calibrated from the weights themselves (no data needed); input and
    KV quantizers from what `forward_loop(model)` pushes through them. Scales are then
    synchronised across ranks; a quantizer that saw no data on any rank is an error.
    """
    named = [(n, q) for n, q in quantizers(model) if q.needs_calibration]
    for _, q in named:
        q.start_calibration()
    try:
        for module in model.modules():
            if isinstance(module, QuantLinearMixin) and module.weight_quantizer is not None:
                wq = module.weight_quantizer
                if wq.calibrating:
                    with torch.no_grad():
                        wq.collect(module.weight)
                    wq.set_amax(_finish(wq, "weight"))
        if forward_loop is not None and any(q.calibrating for _, q in named):
            was_training = model.training
            model.eval()
            with torch.no_grad():
                forward_loop(model)
            model.train(was_training)
        missing = []
        for name, q in named:
            if not q.calibrating:
                continue
            amax = _finish(q, name)
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


def _finish(q, name: str) -> torch.Tensor:
    local = q.local_amax()
    amax = torch.zeros(q.amax.shape) if local is None else local.float().reshape(q.amax.shape).clone()
    return sync_amax(amax, q.reduce_over_tp)
