"""The `quantize` mode: module conversion with pattern checks and a report."""
from __future__ import annotations

import logging

from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.mode_patterns import hits_on_all_ranks
from nemo_quant.modes import Mode, register_mode
from nemo_quant.quantization.config import QuantConfig
from nemo_quant.quantization.kernel_dispatch import set_kernel_policy
from nemo_quant.quantization.modules import ConversionReport, convert_model, plan_conversion
from nemo_quant.quantization.validate import validate_quant_config
from nemo_quant.runtime.distributed_init import is_main_rank

log = logging.getLogger(__name__)


def _check(model: nn.Module, cfg: QuantConfig) -> None:
    """Every pattern must match somewhere (under PP, perhaps on another stage's layers only)
    and every planned conversion must fit the module's shapes. The hit counts are reduced on
    every rank even when this rank's plan failed, so no rank waits on a collective."""
    def plan() -> list[int]:
        _, report = plan_conversion(model, cfg)
        return report.pattern_hits + report.override_hits

    hits = hits_on_all_ranks(plan, len(cfg.exclude) + len(cfg.overrides))
    _check_fold(model, cfg)
    keys = [f"quant.exclude[{i}]={p!r}" for i, p in enumerate(cfg.exclude)]
    keys += [f"quant.overrides[{i}].pattern={o.pattern!r}" for i, o in enumerate(cfg.overrides)]
    for i, key in enumerate(keys):
        if hits[i] == 0:
            raise ConfigError(
                f"{key} matches no quantizable module; module names look "
                "like 'decoder.layers.0.self_attention.linear_qkv' or 'output_layer' (fnmatch syntax)."
            )


def _check_fold(model: nn.Module, cfg: QuantConfig) -> None:
    """quant.search.fold_all_scales needs layers whose input is linear in the layer before them."""
    from nemo_quant.quantization.algorithms.fold import fold_problem
    from nemo_quant.quantization.config import SMOOTHING, Algorithm

    if not cfg.search.fold_all_scales or Algorithm(cfg.algorithm) not in SMOOTHING:
        return
    for name, _ in model.named_modules():
        problem = fold_problem(model, name)
        if problem:
            raise ConfigError(problem)


def _apply(model: nn.Module, cfg: QuantConfig) -> ConversionReport:
    if cfg.auto is not None:
        raise ConfigError("quant.auto is a search, not a format: run nemo_quant.quantization.mixed_precision.auto_plan "
                          "(nemo-quant ptq does) and apply the plan it returns.")
    if cfg.kernels is not None:
        set_kernel_policy(cfg.kernels)
    report = convert_model(model, cfg)
    if sum(report.converted.values()) == 0 and is_main_rank():
        log.warning("quantize: no module was converted (%s)", report.summary())
    if is_main_rank():
        print(f"[nemo_quant] {cfg.name}: {report.summary()}", flush=True)
    return report


def _calibrate(model: nn.Module, forward_loop) -> None:
    from nemo_quant.quantization.calibrate import calibrate

    calibrate(model, forward_loop)


QUANTIZE = register_mode(Mode(
    name="quantize",
    config_class=QuantConfig,
    apply=_apply,
    may_follow=frozenset({"prune", "sparsity"}),
    validate=validate_quant_config,
    check=_check,
    data_step=_calibrate,
))
