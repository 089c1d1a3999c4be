"""TensorQuantizer: the module that fake-quantizes one tensor (a weight, an input, K or V).

Its amax lives in a buffer whose shape is fixed at creation (scalar, [out, 1] or
[out, blocks]), NaN until calibrated, so state dicts and Megatron sharded checkpoints have
the same keys before and after calibration. Scales are buffers, never parameters: QAT
trains weights through a straight-through estimator while scales stay frozen.
"""
from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from nemo_quant.numerics.blocks import num_blocks, to_blocks
from nemo_quant.distributed import dp_all_gather_rows, tp_all_gather, tp_all_reduce
from nemo_quant.quantization.calibrators import BatchPercentileCalibrator, MaxCalibrator, MseCalibrator, PercentileCalibrator
from nemo_quant.quantization.config import BLOCK_ONLY, NO_CALIBRATION, CalibratorName, Granularity, QFormat, QuantizerSpec
from nemo_quant.quantization.fake_quant import abs_max, fake_quant, fake_quant_ste


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
        # [out, 1] amax can mean per channel or "one block": decide by the spec, not the shape.
        self.per_channel = len(self._amax.shape) == 2 and Granularity(spec.granularity) == Granularity.channel
        self._calibrator = None
        self._calibrated = not self.needs_calibration
        # Set by conversion: the TP-sharded axis of the amax (None = replicated) and whether
        # the statistic spans the TP group (reduced across it, then identical on every rank).
        self.amax_tp_axis: int | None = None
        self.reduce_over_tp = True
        # Row-parallel weights: this rank holds input columns [offset, offset + local) of
        # `global_in`; blocks are laid over the *global* input dim so that the scales do not
        # depend on TP (a block may straddle two ranks).
        self.block_offset = 0
        self.global_in: int | None = None
        # Row-parallel inputs: each rank sees a slice of the input dim. Histogram statistics
        # (percentile, per-tensor MSE) are then taken over the TP-gathered input, as at TP=1:
        # a max of per-slice percentiles is a different statistic.
        self.input_split_over_tp = False
        self.bypass = False  # set while algorithms observe the unquantized model

    def use_global_blocks(self, offset: int, global_in: int) -> None:
        self.block_offset, self.global_in = offset, global_in
        out = self._amax.shape[0]
        self._amax = torch.full((out, num_blocks(global_in, self.spec.effective_block_size())), float("nan"))

    def _sliced(self, x: torch.Tensor) -> bool:
        """`x` is this rank's slice of a row-parallel weight (not the gathered whole)."""
        return self.global_in is not None and x.shape[-1] != self.global_in

    def _block_ids(self, local_in: int, device) -> torch.Tensor:
        cols = torch.arange(self.block_offset, self.block_offset + local_in, device=device)
        return cols // self.spec.effective_block_size()

    def _per_global_block(self, values: torch.Tensor, how: str) -> torch.Tensor:
        """Reduce [out, local_in] values into this rank's share of the [out, global blocks] grid."""
        ids = self._block_ids(values.shape[-1], values.device).expand_as(values)
        grid = torch.zeros(self._amax.shape, dtype=values.dtype, device=values.device)
        return grid.scatter_reduce_(1, ids, values, how)

    # -- statistics ------------------------------------------------------------------------
    def reduce_amax(self, x: torch.Tensor) -> torch.Tensor:
        shape = self._amax.shape
        if len(shape) == 0:
            return abs_max(x)
        if self.per_channel:
            return abs_max(x, x.shape[-1])
        if self._sliced(x):
            return self._per_global_block(x.abs().float(), "amax")
        return abs_max(x, self.spec.effective_block_size())

    def _fake_quant_args(self, x: torch.Tensor, amax: torch.Tensor):
        """(spec, amax) to quantize `x` with; sliced blocks become one scale per column."""
        if amax.ndim == 2 and not self.per_channel and self._sliced(x):
            return replace(self.spec, granularity=Granularity.channel), amax[:, self._block_ids(x.shape[-1], x.device)]
        return self.spec, amax

    def _quant_error(self, x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        err = (fake_quant(x, *self._fake_quant_args(x, amax)) - x).pow(2)
        if len(self._amax.shape) == 0:
            return err  # per-tensor: elementwise, weighted by histogram counts by the caller
        if self.per_channel:
            return err.sum(dim=1, keepdim=True)
        if self._sliced(x):
            return self._per_global_block(err, "sum")
        return to_blocks(err, self.spec.effective_block_size()).sum(dim=-1)

    @property
    def uses_distribution(self) -> bool:
        """Its calibrator reads a histogram or compares candidate errors (percentile, MSE): a
        statistic of the whole tensor, which per-rank pieces reduced over TP do not give."""
        return CalibratorName(self.spec.calibrator) in (CalibratorName.mse, CalibratorName.percentile)

    def start_calibration(self) -> None:
        name = CalibratorName(self.spec.calibrator)
        per_tensor = len(self._amax.shape) == 0
        if name == CalibratorName.batch_percentile:
            self._calibrator = BatchPercentileCalibrator(self.reduce_amax, self.spec.percentile,
                                                         tp_all_reduce if self.reduce_over_tp else None, dp_all_gather_rows)
        elif name == CalibratorName.percentile and per_tensor:
            self._calibrator = PercentileCalibrator(self.spec.percentile)
        elif name == CalibratorName.mse:
            # MSE sees whole tensors at any TP (TP-gathered inputs here, gathered weights in
            # calibrate()): errors summed over ranks would round differently from TP=1's.
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
        if self.bypass:
            return x
        if self._calibrator is not None:
            whole = self.input_split_over_tp and self.uses_distribution  # inputs are per tensor: a histogram
            self._calibrator.collect(tp_all_gather(x, dim=-1) if whole else x)
            return x  # statistics come from unquantized values
        if not self._calibrated:
            raise NotCalibratedError(
                f"{self.role} quantizer ({self.spec.format}) has no scale: run nemo_quant.calibrate(model, "
                "forward_loop) or load a checkpoint that holds calibrated scales."
            )
        spec, amax = self._fake_quant_args(x, self._amax.to(x.device))
        return fake_quant_ste(x, spec, amax)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.needs_calibration:
            self._calibrated = not bool(torch.isnan(self._amax).any())

    def extra_repr(self) -> str:
        s = self.spec
        gran = Granularity(s.granularity).value
        if gran == "block" or QFormat(s.format) in BLOCK_ONLY:
            gran = f"block{s.effective_block_size()}"
        if not self.needs_calibration:
            state = "dynamic scales"
        elif self._calibrated:
            a = self._amax
            state = f"amax={a.item():.4g}" if a.numel() == 1 else f"amax[{tuple(a.shape)}] in [{a.min().item():.3g}, {a.max().item():.3g}]"
        else:
            state = "uncalibrated"
        return f"{QFormat(s.format).value} {gran} {CalibratorName(s.calibrator).value}, {state}"
