"""Checks of a quantization config that types cannot express; errors name the key and the fix."""
from __future__ import annotations

from nemo_quant.config.validate import ConfigError
from nemo_quant.quantization.config import BLOCK_ONLY, FP8, Granularity, QFormat, QuantConfig, QuantizerSpec


def _check_spec(spec: QuantizerSpec, key: str, role: str) -> None:
    fmt, gran = QFormat(spec.format), Granularity(spec.granularity)
    if fmt in BLOCK_ONLY and gran != Granularity.block:
        raise ConfigError(f"{key}.granularity={gran.value}: {fmt.value} is block-scaled; set {key}.granularity=block.")
    if fmt in BLOCK_ONLY and spec.block_size not in (0, BLOCK_ONLY[fmt]):
        raise ConfigError(f"{key}.block_size={spec.block_size}: {fmt.value} uses blocks of {BLOCK_ONLY[fmt]}; set 0 or {BLOCK_ONLY[fmt]}.")
    if fmt in FP8 and gran == Granularity.block:
        raise ConfigError(f"{key}.granularity=block: FP8 scales are per tensor or per channel; use nvfp4/mxfp8 for blocks.")
    if role != "weight" and gran == Granularity.channel:
        raise ConfigError(f"{key}.granularity=channel: per-channel scales are for weights; use tensor or block.")
    if fmt == QFormat.nf4 and role != "weight":
        raise ConfigError(f"{key}.format=nf4: NF4 is a weight-only format.")
    if role == "kv_cache" and fmt not in FP8 | {QFormat.nvfp4, QFormat.int8}:
        raise ConfigError(f"{key}.format={fmt.value}: the KV cache supports fp8_e4m3, fp8_e5m2, int8 and nvfp4.")
    if spec.block_size < 0 or (gran == Granularity.block and spec.effective_block_size() < 2):
        raise ConfigError(f"{key}.block_size={spec.block_size}: must be 0 (default) or at least 2.")
    if not 0.0 < spec.percentile <= 100.0:
        raise ConfigError(f"{key}.percentile={spec.percentile}: must be in (0, 100].")


def validate_quant_config(cfg: QuantConfig, key: str = "quant") -> None:
    if cfg.weight is None and cfg.input is None and cfg.kv_cache is None:
        raise ConfigError(f"{key}: weight, input and kv_cache are all null; pick a preset (quant=fp8, quant=int4_awq, ...).")
    for role in ("weight", "input", "kv_cache"):
        spec = getattr(cfg, role)
        if spec is not None:
            _check_spec(spec, f"{key}.{role}", role)
    for i, pattern in enumerate(cfg.exclude):
        if not pattern or pattern.strip() != pattern:
            raise ConfigError(f"{key}.exclude[{i}]={pattern!r}: empty or padded pattern.")
