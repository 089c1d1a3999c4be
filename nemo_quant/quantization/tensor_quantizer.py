"""TensorQuantizer: the module that fake-quantizes one tensor (a weight, an input, K or V).

Its amax lives in a buffer whose shape is fixed at creation (scalar, [out, 1] or
[out, blocks]), NaN until calibrated, so state dicts and Megatron sharded checkpoints have
the same keys before and after calibration. Scales are buffers, never parameters: QAT
trains weights through a straight-through estimator while scales stay frozen.
"""
from __future__ import annotations

import torch
from torch import nn

from nemo_quant.numerics.blocks import num_blocks, to_blocks
from nemo_quant.quantization.calibrators import MaxCalibrator, MseCalibrator, PercentileCalibrator
from nemo_quant.quantization.config import NO_CALIBRATION, CalibratorName, Granularity, QFormat, QuantizerSpec
from nemo_quant.quantization.fake_quant import fake_quant, fake_quant_ste


class NotCalibratedError(RuntimeError):
    pass


def amax_shape(spec: QuantizerSpec, role: str, weight_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    gran, fmt = Granularity(spec.granularity), QFormat(spec.format)
    if role != "weight" or gran == Granularity.tensor or fmt in NO_CALIBRATION or fmt == QFormat.nvfp4:
        return ()  # NVFP4 calibrates its global (per-tensor) amax; block scales are derived
    out, inp = weight_shape
    if gran == Granularity.channel:
        return (out, 1)
    return (out, num_blocks(inp, spec.effective_block_size()))


class TensorQuantizer(nn.Module):
    def __init__(self, spec: QuantizerSpec, role: str, weight_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.spec, self.role = spec, role
        self.register_buffer("_amax", torch.full(amax_shape(spec, role, weight_shape), float("nan")))
        self.needs_calibration = QFormat(spec.format) not in NO_CALIBRATION
        self._calibrator = None
        self._calibrated = not self.needs_calibration
        # Set by conversion: the TP-sharded axis of the amax (None = replicated) and whether
        # per-tensor / per-channel statistics must be max-reduced across TP ranks.
        self.amax_tp_axis: int | None = None
        self.reduce_over_tp = True

    # -- statistics ------------------------------------------------------------------------
    def reduce_amax(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._amax.shape
        if len(shape) == 0:
            return x.abs().amax()
        if shape[1] == 1:
            return x.abs().amax(dim=1, keepdim=True)
        return to_blocks(x, self.spec.effective_block_size()).abs().amax(dim=-1)

    def _quant_error(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        err = (fake_quant(x, self.spec, amax) - x).pow(2)
        if len(self._amax.shape) == 0:
            return err  # per-tensor: elementwise, weighted by histogram counts by the caller
        if self._amax.shape[1] == 1:
            return err.sum(dim=1, keepdim=True)
        return to_blocks(err, self.spec.effective_block_size()).sum(dim=-1)

    def start_calibration(self) -> None:
        name = CalibratorName(self.spec.calibrator)
        per_tensor = len(self._amax.shape) == 0
        if name == CalibratorName.percentile and per_tensor:
            self._calibrator = PercentileCalibrator(self.spec.percentile)
        elif name == CalibratorName.mse:
            self._calibrator = MseCalibrator(self.reduce_amax, self._quant_error, per_tensor)
        else:  # percentile of per-channel/per-block weight statistics degenerates to max
            self._calibrator = MaxCalibrator(self.reduce_amax)

    @property
    def calibrating(self) -> bool:
        return self._calibrator is not None

    def collect(self, x: torch.Tensor) -> None:
        self._calibrator.collect(x)

    def local_amax(self) -> torch.Tensor | None:
        """The amax this rank measured (None if it saw no data); ends the calibration."""
        amax = self._calibrator.compute_amax() if self._calibrator is not None else None
        self._calibrator = None
        return amax

    def set_amax(self, amax: torch.Tensor) -> None:
        with torch.no_grad():
            self._amax.copy_(amax.reshape(self._amax.shape).to(self._amax))
        self._calibrated = True

    @property
    def amax(self) -> torch.Tensor:
        return self._amax

    @property
    def is_calibrated(self) -> bool:
        return self._calibrated

    # -- forward ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibrator is not None:
            self._calibrator.collect(x)
            return x  # statistics come from unquantized values
        if not self._calibrated:
            raise NotCalibratedError(
                f"{self.role} quantizer ({self.spec.format}) has no scale: run nemo_quant.calibrate(model, "
                "forward_loop) or load a checkpoint that holds calibrated scales."
            )
        return fake_quant_ste(x, self.spec, self._amax.to(x.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.needs_calibration:
            self._calibrated = not bool(torch.isnan(self._amax).any())

    def extra_repr(self) -> str:
        s = self.spec
        gran = Granularity(s.granularity).value
        if gran == "block" or QFormat(s.format).value in ("nvfp4", "mxfp4", "mxfp8", "nf4"):
            gran = f"block{s.effective_block_size()}"
        if not self.needs_calibration:
            state = "dynamic scales"
        elif self._calibrated:
            a = self._amax
            state = f"amax={a.item():.4g}" if a.numel() == 1 else f"amax[{tuple(a.shape)}] in [{a.min().item():.3g}, {a.max().item():.3g}]"
        else:
            state = "uncalibrated"
        return f"{QFormat(s.format).value} {gran} {CalibratorName(s.calibrator).value}, {state}"
