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
    batch_percentile = "batch_percentile"  # a percentile of the per-batch maxima


class Ste(str, Enum):
    plain = "plain"  # gradient passes through unchanged
    clipped = "clipped"  # zero gradient where |x| > amax


class Algorithm(str, Enum):
    max = "max"  # calibrate scales only
    smoothquant = "smoothquant"  # per-layer migration strength searched by output error
    awq_lite = "awq_lite"  # activation-aware scale search
    awq_clip = "awq_clip"  # weight clipping search (per row and block)
    awq_full = "awq_full"  # scale search, then clipping search


SMOOTHING = {Algorithm.smoothquant, Algorithm.awq_lite, Algorithm.awq_full}


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
class SearchConfig:
    """Grids and budgets of the SmoothQuant / AWQ searches (quant.search)."""

    scale_grid: int = 10  # alpha in {0, 1/n, ..., 1}: n + 1 candidates per layer (plus "no scaling")
    clip_grid: int = 10  # clip ratios in {clip_min, ..., 1}: n + 1 candidates per block
    clip_min: float = 0.5
    # Every token_stride-th token of the calibration data is kept (per layer) to measure the
    # output error of searches that quantize activations too (SmoothQuant).
    token_stride: int = 16
    # Memory budget of the per-layer statistics (Hessians, token samples) in GiB; layers are
    # calibrated in groups that fit, one forward pass per group. 0 = all layers in one pass.
    memory_gib: float = 0.0
    # Fold o_proj's smoothing scale into v_proj's rows and down_proj's into up_proj's (tied across
    # the query heads of a KV group), so no layer keeps a pre_quant_scale: what formats without
    # one need (export.format=compressed_tensors). q/k/v and gate/up fold into the norms anyway.
    fold_all_scales: bool = False


@dataclass
class GptqConfig:
    """GPTQ error compensation of the weights (quant.gptq), after the algorithm's scaling."""

    enabled: bool = False
    block_size: int = 128  # columns updated together (lazy batch updates)
    damp: float = 0.01  # fraction of the mean Hessian diagonal added to it
    act_order: bool = True  # quantize columns in order of decreasing Hessian diagonal


@dataclass
class LayerOverride:
    """Quantizers for the linear layers whose names match `pattern` (first match wins);
    null weight and input leave that layer in high precision."""

    pattern: str = "*"
    weight: Optional[QuantizerSpec] = None
    input: Optional[QuantizerSpec] = None


@dataclass
class AutoConfig:
    """Auto mixed precision (quant.auto): per-layer formats within an effective-bits budget."""

    formats: list[str] = field(default_factory=lambda: ["nvfp4", "fp8"])  # presets; bf16 is implicit
    effective_bits: float = 6.0  # stored bits per weight of the quantizable layers, scales included
    score_windows: int = 8  # calibration windows used for the sensitivity pass
    plan_path: Optional[str] = None  # where the plan is written (default: <run dir>/quant/auto_plan.yaml)


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
    search: SearchConfig = field(default_factory=SearchConfig)
    gptq: GptqConfig = field(default_factory=GptqConfig)
    # Per-layer formats (auto mixed precision writes these); layers matching no override
    # use `weight` / `input`.
    overrides: list[LayerOverride] = field(default_factory=list)
    auto: Optional[AutoConfig] = None
    # Fake-quant implementation: auto (kernels where they build, else the pure-torch
    # reference, reported), reference, or kernels (error without them). null = the
    # NEMO_QUANT_KERNELS environment variable, default auto.
    kernels: Optional[str] = None
