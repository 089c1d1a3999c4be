"""Checks of a quantization config that types cannot express; errors name the key and the fix."""
from __future__ import annotations

from nemo_quant.config.validate import ConfigError
from nemo_quant.quantization.kernel_dispatch import check_policy
from nemo_quant.quantization.config import (
    BLOCK_ONLY, FP8, INT_BITS, SMOOTHING, Algorithm, Granularity, QFormat, QuantConfig, QuantizerSpec,
)


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
    if cfg.kernels is not None:
        check_policy(cfg.kernels, f"{key}.kernels")
    if cfg.auto is not None:
        _check_auto(cfg, key)
    elif cfg.weight is None and cfg.input is None and cfg.kv_cache is None and not cfg.overrides:
        raise ConfigError(f"{key}: weight, input and kv_cache are all null; pick a preset (quant=fp8, quant=int4_awq, ...).")
    for role in ("weight", "input", "kv_cache"):
        spec = getattr(cfg, role)
        if spec is not None:
            _check_spec(spec, f"{key}.{role}", role)
    for i, pattern in enumerate(cfg.exclude):
        if not pattern or pattern.strip() != pattern:
            raise ConfigError(f"{key}.exclude[{i}]={pattern!r}: empty or padded pattern.")
    weights = [(f"{key}.weight", cfg.weight)]
    for i, override in enumerate(cfg.overrides):
        if not override.pattern or override.pattern.strip() != override.pattern:
            raise ConfigError(f"{key}.overrides[{i}].pattern={override.pattern!r}: empty or padded pattern.")
        for role in ("weight", "input"):
            spec = getattr(override, role)
            if spec is not None:
                _check_spec(spec, f"{key}.overrides[{i}].{role}", role)
        weights.append((f"{key}.overrides[{i}].weight", override.weight))
    _check_algorithm(cfg, key, [(k, w) for k, w in weights if w is not None])


def _check_algorithm(cfg: QuantConfig, key: str, weights: list[tuple[str, QuantizerSpec]]) -> None:
    algo = Algorithm(cfg.algorithm)
    if (algo != Algorithm.max or cfg.gptq.enabled) and not weights:
        raise ConfigError(f"{key}.algorithm={algo.value}: the algorithms act on weight quantizers; set {key}.weight.")
    # (what, formats it needs, their name, fix)
    needs = []
    if algo in (Algorithm.awq_clip, Algorithm.awq_full):
        needs.append((f"{key}.algorithm={algo.value}", set(INT_BITS), "INT",
                      "use awq_lite for block formats whose scales come from the data"))
    if cfg.gptq.enabled:
        needs.append((f"{key}.gptq.enabled=true", set(INT_BITS) | FP8, "INT or FP8",
                      "disable it for this format (block scales that come from the data have no fixed grid)"))
    for what, formats, kind, fix in needs:
        for wkey, spec in weights:
            if QFormat(spec.format) not in formats:
                raise ConfigError(f"{what} needs {kind} weights, but {wkey}.format={QFormat(spec.format).value}; {fix}.")
    s = cfg.search
    if s.scale_grid < 1 or s.clip_grid < 1 or s.token_stride < 1:
        raise ConfigError(f"{key}.search: scale_grid, clip_grid and token_stride must be >= 1.")
    if not 0.0 < s.clip_min <= 1.0:
        raise ConfigError(f"{key}.search.clip_min={s.clip_min}: must be in (0, 1].")
    if s.memory_gib < 0:
        raise ConfigError(f"{key}.search.memory_gib={s.memory_gib}: must be >= 0 (0 = no limit).")
    if cfg.gptq.block_size < 1 or not 0.0 < cfg.gptq.damp < 1.0:
        raise ConfigError(f"{key}.gptq: block_size must be >= 1 and damp in (0, 1).")
    if algo in SMOOTHING and cfg.input is not None and Granularity(cfg.input.granularity) != Granularity.tensor \
            and QFormat(cfg.input.format) not in BLOCK_ONLY:
        raise ConfigError(f"{key}.algorithm={algo.value} with {key}.input.granularity=block: smoothing searches "
                          "assume per-tensor INT/FP8 inputs; use granularity=tensor.")


def _check_auto(cfg: QuantConfig, key: str) -> None:
    from nemo_quant.quantization.mixed_precision import load_preset, weight_bits

    auto = cfg.auto
    if not auto.formats:
        raise ConfigError(f"{key}.auto.formats is empty; list presets such as [nvfp4, fp8].")
    smallest = 16.0
    for i, name in enumerate(auto.formats):
        try:
            preset = load_preset(name)
        except FileNotFoundError:
            raise ConfigError(f"{key}.auto.formats[{i}]={name!r}: no such preset in conf/quant.") from None
        if preset.weight is None:
            raise ConfigError(f"{key}.auto.formats[{i}]={name!r} quantizes no weights; pick a weight format preset.")
        smallest = min(smallest, weight_bits(preset.weight))
    if not smallest <= auto.effective_bits <= 16.0:
        raise ConfigError(f"{key}.auto.effective_bits={auto.effective_bits}: must lie in [{smallest:.3f}, 16] "
                          "(the smallest listed format .. high precision).")
    if auto.score_windows < 1:
        raise ConfigError(f"{key}.auto.score_windows={auto.score_windows}: must be >= 1.")
    if cfg.weight is not None or cfg.input is not None or cfg.overrides:
        raise ConfigError(f"{key}.auto is set together with {key}.weight/input/overrides; the plan decides them, "
                          "set those to null.")
