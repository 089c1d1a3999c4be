"""Auto mixed precision: bits accounting, the budgeted choice, and the plan as a Hydra preset."""
import itertools

import pytest
import torch

from nemo_quant.quantization.config import AutoConfig, QuantConfig, QuantizerSpec
from nemo_quant.quantization.mixed_precision import BUDGET_UNITS, FormatOption, auto_plan, choose_formats, weight_bits, write_plan

NVFP4 = QuantizerSpec(format="nvfp4", granularity="block")
FP8 = QuantizerSpec(format="fp8_e4m3")
OPTIONS = [FormatOption("bf16", None, None), FormatOption("nvfp4", NVFP4, NVFP4), FormatOption("fp8", FP8, FP8)]


def test_weight_bits_count_scales():
    assert weight_bits(NVFP4) == 4.5  # E2M1 + one FP8 scale per 16
    assert weight_bits(QuantizerSpec(format="int4", granularity="block", block_size=128)) == 4.125
    assert weight_bits(FP8) == 8 and weight_bits(None) == 16


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [5.0, 6.0, 8.0, 11.0])
def test_choice_is_optimal_within_budget(seed, budget):
    g = torch.Generator().manual_seed(seed)
    layers = {f"l{i}": (int(torch.randint(1, 5, (1,), generator=g)) * 1000,
                        [0.0, float(torch.rand(1, generator=g)) * 10, float(torch.rand(1, generator=g))]) for i in range(7)}
    choice = choose_formats(layers, OPTIONS, budget)
    params = sum(p for p, _ in layers.values())

    def bits(c):
        return sum(layers[n][0] * OPTIONS[i].bits for n, i in c.items()) / params

    def score(c):
        return sum(layers[n][1][i] for n, i in c.items())

    assert bits(choice) <= budget + 1e-9
    # Exact up to the budget's discretisation: costs round up by < 1 step of budget / 20000 each.
    slack = budget * (1 - len(layers) / BUDGET_UNITS)
    best = min(score(dict(zip(layers, c))) for c in itertools.product(range(3), repeat=7)
               if bits(dict(zip(layers, c))) <= slack)
    assert score(choice) <= best + 1e-9


def test_budget_below_smallest_format_is_an_error():
    with pytest.raises(ValueError, match="effective_bits=4.0"):
        choose_formats({"a": (10, [0.0, 1.0, 0.5])}, OPTIONS, 4.0)


def test_auto_plan_on_tiny_gpt_is_a_loadable_preset(tiny_model, tmp_path):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from nemo_quant.config.schema import register_configs
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from tests.quant_helpers import logits, loop_over, tokens

    cfg = QuantConfig(name="auto", auto=AutoConfig(formats=["nvfp4", "fp8"], effective_bits=6.0, score_windows=4))
    plan, summary = auto_plan(tiny_model, tokens(5, 4, 17), cfg)
    assert summary["effective_bits"] <= 6.0 and summary["share_nvfp4"] > 0
    assert len(plan.overrides) == 16 and plan.weight is None  # every linear but the output layer
    write_plan(plan, tmp_path / "quant" / "my_plan.yaml")
    register_configs()
    with initialize_config_module(config_module="nemo_quant.conf", version_base="1.3"):
        composed = compose(config_name="config", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "quant=my_plan"])
    loaded = OmegaConf.to_object(composed.quant)
    assert loaded == plan
    apply_modes(tiny_model, [("quantize", loaded)])
    fmt = {o.pattern: (o.weight.format.value if o.weight else None) for o in plan.overrides}
    for name, module in tiny_model.named_modules():
        if name in fmt:
            wq = getattr(module, "weight_quantizer", None)
            assert (wq.spec.format.value if wq is not None else None) == fmt[name], name
    calibrate(tiny_model, loop_over(tokens(1)))
    assert torch.isfinite(logits(tiny_model, tokens(2))).all()


def test_auto_config_errors_name_the_key(tiny_model):
    from nemo_quant.config.validate import ConfigError
    from nemo_quant.modes import apply_modes

    with pytest.raises(ConfigError, match=r"quant.auto.formats\[0\]='nvfp5'"):
        apply_modes(tiny_model, [("quantize", {"name": "a", "auto": {"formats": ["nvfp5"]}})])
    with pytest.raises(ConfigError, match="quant.auto.effective_bits=3.0"):
        apply_modes(tiny_model, [("quantize", {"name": "a", "auto": {"effective_bits": 3.0}})])
    with pytest.raises(ConfigError, match="auto_plan"):
        apply_modes(tiny_model, [("quantize", {"name": "a", "auto": {}})])
