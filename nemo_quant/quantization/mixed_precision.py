"""Auto mixed precision: per-layer format choice under an effective-bits budget.

1. Sensitivity: forward + backward on calibration windows (Megatron's schedule, any TP/PP/DP).
   For every linear layer and candidate format f the score is sum((dL/dY * (Y_f - Y))^2),
   the Fisher estimate of the loss increase when only that layer is quantized with f
   (Y_f: the layer's output with weight and input fake-quantized by f, input amax = the
   batch max). Scores are summed over TP (split rows), DP (different data) and gathered
   over PP, so every rank holds all layers' scores.
2. Choice: minimise the summed score subject to sum(params * bits) <= budget * sum(params),
   a multiple-choice knapsack solved exactly by dynamic programming over the budget in
   20,000 steps (costs rounded up: the plan never exceeds the budget).
3. The plan is a QuantConfig whose `overrides` name each layer (global names, so a plan made
   at one PP layout applies at another); `write_plan` stores it as a Hydra quant preset.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

from nemo_quant.distributed import dp_all_reduce, gather_messages, tp_all_reduce
from nemo_quant.quantization.config import BLOCK_ONLY, INT_BITS, Granularity, LayerOverride, QFormat, QuantConfig, QuantizerSpec
from nemo_quant.quantization.fake_quant import fake_quant
from nemo_quant.quantization.modules import global_name

HIGH_PRECISION_BITS = 16.0
BUDGET_UNITS = 20_000


def weight_bits(spec: QuantizerSpec | None) -> float:
    """Stored bits per weight including scales (16-bit INT block scales, 8-bit NVFP4/MX scales)."""
    if spec is None:
        return HIGH_PRECISION_BITS
    fmt = QFormat(spec.format)
    base = {QFormat.int8: 8, QFormat.int4: 4, QFormat.nvfp4: 4, QFormat.mxfp4: 4, QFormat.mxfp8: 8, QFormat.nf4: 4}.get(fmt, 8)
    if fmt in BLOCK_ONLY:
        return base + 8.0 / spec.effective_block_size()
    if fmt in INT_BITS and Granularity(spec.granularity) == Granularity.block:
        return base + 16.0 / spec.effective_block_size()
    return float(base)


@dataclass
class FormatOption:
    name: str
    weight: QuantizerSpec | None
    input: QuantizerSpec | None

    @property
    def bits(self) -> float:
        return weight_bits(self.weight)


def load_preset(name: str) -> QuantConfig:
    """A preset of conf/quant as a typed QuantConfig (without going through Hydra's search path)."""
    from importlib import resources

    path = resources.files("nemo_quant.conf") / "quant" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"quant.auto.formats: no preset {name!r} in conf/quant")
    raw = OmegaConf.load(str(path))
    raw.pop("defaults", None)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(QuantConfig), raw))


def _scored_layers(model: nn.Module, exclude: list[str]) -> list[tuple[str, nn.Module]]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    return [(global_name(model, n), m) for n, m in model.named_modules()
            if type(m) in (ColumnParallelLinear, RowParallelLinear)
            and not any(fnmatch.fnmatchcase(global_name(model, n), p) for p in exclude)]


class _Scorer:
    """Forward hook on one layer; scores accumulate in the output's gradient hook."""

    def __init__(self, module: nn.Module, options: list[FormatOption]):
        self.module, self.options = module, options
        self.row_parallel = module.__class__.__name__ == "RowParallelLinear"
        self.scores = torch.zeros(len(options), dtype=torch.float64)
        self._weights: list[torch.Tensor] | None = None

    def quantized_weights(self) -> list[torch.Tensor]:
        if self._weights is None:
            w = self.module.weight.detach().float()
            self._weights = [fake_quant(w, o.weight, self._weight_amax(w, o.weight)) if o.weight else w for o in self.options]
        return self._weights

    @staticmethod
    def _weight_amax(w: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
        fmt, gran = QFormat(spec.format), Granularity(spec.granularity)
        if fmt == QFormat.nvfp4 or gran == Granularity.tensor:
            return tp_all_reduce(w.abs().amax(), "max")
        if gran == Granularity.channel:
            return w.abs().amax(dim=1, keepdim=True)
        from nemo_quant.numerics.blocks import to_blocks

        return to_blocks(w, spec.effective_block_size()).abs().amax(dim=-1)

    def __call__(self, module, args, output) -> None:
        y = output[0] if isinstance(output, tuple) else output
        if not y.requires_grad:
            return
        x = args[0].detach().float()
        y.register_hook(lambda g: self._score(x, g.detach().float()))

    def _score(self, x: torch.Tensor, g: torch.Tensor) -> None:
        with torch.no_grad():
            weights = self.quantized_weights()
            reference = x @ self.module.weight.detach().float().T
            amax_x = tp_all_reduce(x.abs().amax(), "max") if self.row_parallel else x.abs().amax()
            for i, option in enumerate(self.options):
                xq = fake_quant(x, option.input, amax_x) if option.input is not None else x
                diff = xq @ weights[i].T - reference
                if self.row_parallel:
                    diff = tp_all_reduce(diff, "sum")  # partial sums of the split input dim
                self.scores[i] += (g * diff).pow(2).sum(dtype=torch.float64)


def layer_sensitivity(model: nn.Module, windows: torch.Tensor, options: list[FormatOption],
                      exclude: list[str], micro_batch_size: int = 1) -> dict[str, tuple[int, list[float]]]:
    """{global layer name: (parameter count, score per option)} for every scored layer, on every rank."""
    from nemo_quant.runtime.pipeline import data_parallel_batches
    from nemo_quant.training.loop import forward_backward
    from nemo_quant.utils.progress import progress

    layers = _scored_layers(model, exclude)
    scorers = {name: _Scorer(module, options) for name, module in layers}
    handles = [module.register_forward_hook(scorers[name]) for name, module in layers]
    was_training = model.training
    model.train()
    try:
        batches = data_parallel_batches(windows, micro_batch_size)
        bar = progress(total=len(batches), desc="sensitivity", unit="batch")
        for batch in batches:
            forward_backward(model, batch, micro_batch_size)
            bar.update(1)
        bar.close()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.grad = None
        model.train(was_training)
    local = {}
    for name, module in layers:
        scores = scorers[name].scores
        if not scorers[name].row_parallel:
            tp_all_reduce(scores, "sum")  # column parallel: each rank scored its own rows
        dp_all_reduce(scores, "sum")
        local[name] = (module.input_size * module.output_size, scores.tolist())
    merged: dict[str, tuple[int, list[float]]] = {}
    for part in gather_messages(local):  # PP stages hold different layers
        merged.update(part)
    return dict(sorted(merged.items()))


def choose_formats(sensitivity: dict[str, tuple[int, list[float]]], options: list[FormatOption],
                   effective_bits: float) -> dict[str, int]:
    """Option index per layer minimising the summed score within the bits budget."""
    names = list(sensitivity)
    params = torch.tensor([float(sensitivity[n][0]) for n in names], dtype=torch.float64)
    scores = torch.tensor([sensitivity[n][1] for n in names], dtype=torch.float64)  # [layers, options]
    bits = torch.tensor([o.bits for o in options], dtype=torch.float64)
    budget = effective_bits * float(params.sum())
    if float((params * bits.min()).sum()) > budget * (1 + 1e-12):
        raise ValueError(f"quant.auto.effective_bits={effective_bits}: below the smallest format's "
                         f"{float(bits.min()):.3f} bits; raise it or add a smaller format.")
    cost = params.unsqueeze(1) * bits.unsqueeze(0)
    # Dynamic programme over the budget in BUDGET_UNITS steps; costs round up, so the plan
    # never exceeds the budget. best[b]: least score of the layers so far within b units.
    unit = budget / BUDGET_UNITS
    steps = torch.ceil(cost / unit - 1e-9).long()
    best = torch.zeros(BUDGET_UNITS + 1, dtype=torch.float64)
    picks = torch.zeros(len(names), BUDGET_UNITS + 1, dtype=torch.int8)
    for layer in range(len(names)):
        candidates = torch.full((len(options), BUDGET_UNITS + 1), float("inf"), dtype=torch.float64)
        for o in range(len(options)):
            c = int(steps[layer, o])
            if c <= BUDGET_UNITS:
                candidates[o, c:] = best[: BUDGET_UNITS + 1 - c] + scores[layer, o]
        best, picks[layer] = candidates.min(dim=0)
    if not bool(torch.isfinite(best[-1])):
        raise ValueError(f"quant.auto.effective_bits={effective_bits}: no plan fits (rounding); raise it slightly.")
    choice, left = {}, BUDGET_UNITS
    for layer in reversed(range(len(names))):
        o = int(picks[layer, left])
        choice[names[layer]] = o
        left -= int(steps[layer, o])
    return dict(sorted(choice.items()))


def plan_config(choice: dict[str, int], options: list[FormatOption], base: QuantConfig, name: str) -> QuantConfig:
    overrides = [LayerOverride(pattern=layer, weight=options[i].weight, input=options[i].input) for layer, i in choice.items()]
    return replace(base, name=name, weight=None, input=None, overrides=overrides)


def plan_summary(choice: dict[str, int], sensitivity, options: list[FormatOption]) -> dict[str, float]:
    params = {n: sensitivity[n][0] for n in choice}
    total = sum(params.values())
    bits = sum(params[n] * options[i].bits for n, i in choice.items()) / total
    shares = {o.name: sum(params[n] for n, i in choice.items() if i == k) / total for k, o in enumerate(options)}
    return {"effective_bits": bits, **{f"share_{k}": v for k, v in shares.items()}}


def auto_plan(model: nn.Module, windows: torch.Tensor, cfg: QuantConfig,
              micro_batch_size: int = 1) -> tuple[QuantConfig, dict[str, float]]:
    """Score `model` (unquantized) on `windows`; the plan for `cfg.auto` and its summary."""
    auto = cfg.auto
    options = [FormatOption("bf16", None, None)]
    for preset in auto.formats:
        p = load_preset(preset)
        options.append(FormatOption(preset, p.weight, p.input))
    sensitivity = layer_sensitivity(model, windows[: auto.score_windows], options, cfg.exclude, micro_batch_size)
    choice = choose_formats(sensitivity, options, auto.effective_bits)
    plan = plan_config(choice, options, replace(cfg, auto=None), f"{cfg.name}_{auto.effective_bits:g}bits")
    return plan, plan_summary(choice, sensitivity, options)


def write_plan(cfg: QuantConfig, path: str | Path) -> Path:
    """A Hydra quant preset: put it in a conf dir's quant/ folder and select it with quant=<stem>."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = OmegaConf.to_yaml(OmegaConf.structured(cfg))
    path.write_text("# Written by nemo_quant auto mixed precision.\ndefaults:\n  - schema\n" + body)
    return path
