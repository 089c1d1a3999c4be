"""Typed configuration of the quantization mode (Hydra group `quant`, presets in conf/quant/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class QFormat(str, Enum):
    int8 = "int8"
    int4 = "int4"
    fp8_e4m3 = "fp8_e4m3"
    fp8_e5m2 = "fp8_e5m2"
    nvfp4 = "nvfp4"
    mxfp4 = "mxfp4"
    mxfp8 = "mxfp8"
    nf4 = "nf4"


class Granularity(str, Enum):
    tensor = "tensor"  # one scale
    channel = "channel"  # one scale per output channel (weights only)
    block = "block"  # one scale per `block_size` consecutive inputs


class CalibratorName(str, Enum):
    max = "max"
    percentile = "percentile"
    mse = "mse"


class Ste(str, Enum):
    plain = "plain"  # gradient passes through unchanged
    clipped = "clipped"  # zero gradient where |x| > amax


class Algorithm(str, Enum):
    max = "max"  # calibrate scales only (SmoothQuant / AWQ / GPTQ plug in here)


# Formats whose scale structure is fixed by the format itself.
BLOCK_ONLY = {QFormat.nvfp4: 16, QFormat.mxfp4: 32, QFormat.mxfp8: 32, QFormat.nf4: 64}
INT_BITS = {QFormat.int8: 8, QFormat.int4: 4}
FP8 = {QFormat.fp8_e4m3, QFormat.fp8_e5m2}
NO_CALIBRATION = {QFormat.mxfp4, QFormat.mxfp8, QFormat.nf4}  # scales come from each block


@dataclass
class QuantizerSpec:
    format: QFormat = QFormat.int8
    granularity: Granularity = Granularity.tensor
    block_size: int = 0  # 0 = the format's default (INT: 128, NVFP4: 16, MX: 32, NF4: 64)
    calibrator: CalibratorName = CalibratorName.max
    percentile: float = 99.99
    ste: Ste = Ste.plain

    def effective_block_size(self) -> int:
        if self.block_size:
            return self.block_size
        return BLOCK_ONLY.get(self.format, 128)


@dataclass
class QuantConfig:
    name: str = "custom"
    algorithm: Algorithm = Algorithm.max
    weight: Optional[QuantizerSpec] = None
    input: Optional[QuantizerSpec] = None
    kv_cache: Optional[QuantizerSpec] = None
    # fnmatch patterns over module names (e.g. "decoder.layers.0.mlp.linear_fc2"); each must
    # match at least one module. The output layer stays in high precision by default.
    exclude: list[str] = field(default_factory=lambda: ["*output_layer*"])
