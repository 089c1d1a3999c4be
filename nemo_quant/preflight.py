"""One preflight: every refusal that the configuration and the model's shapes decide, run on
every rank right after the model is built and before its first forward pass.

Commands (`ptq`, `train`, `export`), the Lightning callback and Python users call
`preflight(model, arch, modes, export)` once; it checks the order of the modes, each mode's
config and shape rules (`Mode.check`), and the export against the specs the modes *will*
attach, so a job that cannot finish fails in seconds instead of after calibration. Every rank
raises the same `PreflightError` (the first problem any rank found).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.distributed import gather_messages
from nemo_quant.export.config import ExportConfig, as_export_config
from nemo_quant.export.formats import ExportError
from nemo_quant.export.gather import layer_specs
from nemo_quant.export.writer import export_problems
from nemo_quant.models.arch import LlamaArch
from nemo_quant.modes import ModeError, check_modes


class PreflightError(ConfigError):
    """The job would fail later; the message names the key and the fix."""


def preflight(model: nn.Module, arch: LlamaArch | None, modes: list[tuple[str, Any]] = (),
              export: ExportConfig | Any | None = None) -> None:
    """Refuse, on every rank and before any work, what `apply_modes(model, modes)` followed by
    calibration, training and `export_checkpoint(model, arch, export)` would refuse later
    (`arch` is needed only with `export`)."""
    problem = None
    try:
        typed = check_modes(model, list(modes))
        if export is not None:
            problem = _export_problem(model, arch, as_export_config(export), typed)
    except (ConfigError, ModeError, ExportError) as e:
        problem = str(e)
    problems = [m for m in gather_messages(problem) if m]
    if problems:
        raise PreflightError(problems[0])


def _export_problem(model: nn.Module, arch: LlamaArch, cfg: ExportConfig, typed_modes: list) -> str | None:
    """Export checks against each quantize config the job may end with: the configured one, or
    every candidate preset of an auto mixed-precision search (its plan picks per layer among them)."""
    qlora = [cfg_ for name, cfg_ in typed_modes if name == "qlora"]
    if qlora:
        return export_problems(model, arch, cfg, qlora_cfg=qlora[-1])
    quant = [cfg_ for name, cfg_ in typed_modes if name == "quantize"]
    if not quant:
        return export_problems(model, arch, cfg)
    qcfg = quant[-1]
    if qcfg.auto is not None:
        from nemo_quant.quantization.mixed_precision import load_preset

        for name in qcfg.auto.formats:
            candidate = load_preset(name)
            candidate.exclude = list(qcfg.exclude)
            problem = _planned_export_problem(model, arch, cfg, candidate)
            if problem:
                return f"quant.auto.formats: {name}: {problem}"
        return None
    return _planned_export_problem(model, arch, cfg, qcfg)


def _planned_export_problem(model: nn.Module, arch: LlamaArch, cfg: ExportConfig, qcfg) -> str | None:
    from nemo_quant.quantization.config import SMOOTHING, Algorithm
    from nemo_quant.quantization.modules import plan_conversion

    plan, _ = plan_conversion(model, qcfg)
    linear = {id(p.module): (p.weight_spec, p.input_spec) for p in plan if p.entry.kind == "linear"}
    attention = {id(p.module) for p in plan if p.entry.kind == "attention"}

    def planned_specs(root: nn.Module):
        specs, kv = layer_specs(root)  # modules an earlier mode already quantized keep their specs
        for name, module in root.named_modules():
            if id(module) in linear:
                specs[name] = linear[id(module)]
            if id(module) in attention:
                kv = qcfg.kv_cache
        return specs, kv

    # Folded smoothing scales (quant.search.fold_all_scales) leave no pre-quant scale on any layer.
    smoothing = Algorithm(qcfg.algorithm) in SMOOTHING and not qcfg.search.fold_all_scales
    return export_problems(model, arch, cfg, planned_specs, smoothing=smoothing)
