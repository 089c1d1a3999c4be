"""The quantize mode on a tiny Megatron GPT: conversion, calibration, patterns, mode rules."""
import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import ModeError, apply_modes, mode_state, restore_modes
from nemo_quant.numerics.blocks import to_blocks
from nemo_quant.quantization.calibrate import calibrate
from nemo_quant.quantization.modules import quantizers
from nemo_quant.quantization.tensor_quantizer import NotCalibratedError
from tests.quant_helpers import INT8_CHANNEL, W4A8_KV, logits, loop_over, tokens


def test_conversion_report_repr_and_state(tiny_model, capsys):
    apply_modes(tiny_model, [("quantize", W4A8_KV)])
    out = capsys.readouterr().out
    assert "ColumnParallelLinear x8" in out and "RowParallelLinear x8" in out and "DotProductAttention x4" in out
    assert "excluded by quant.exclude: 1 (output_layer)" in out
    assert type(tiny_model.output_layer).__name__ == "ColumnParallelLinear"
    text = repr(tiny_model.decoder.layers[0])
    assert "(weight_quantizer): TensorQuantizer(int4 block16 max, uncalibrated)" in text
    assert "(k_quantizer): TensorQuantizer(fp8_e4m3 tensor max, uncalibrated)" in text
    assert mode_state(tiny_model)[0]["config"]["weight"]["format"] == "int4"


def test_uncalibrated_forward_refuses(tiny_model):
    apply_modes(tiny_model, [("quantize", W4A8_KV)])
    with pytest.raises(NotCalibratedError, match="calibrate"):
        logits(tiny_model, tokens())


def test_calibration_sets_exact_amax(tiny_model):
    apply_modes(tiny_model, [("quantize", W4A8_KV)])
    batches = [tokens(1), tokens(2)]
    seen = []
    fc1 = tiny_model.decoder.layers[1].mlp.linear_fc1
    hook = fc1.input_quantizer.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs().max()))
    calibrate(tiny_model, loop_over(*batches))
    hook.remove()
    assert fc1.input_quantizer.amax.item() == pytest.approx(max(seen).item())
    w = fc1.weight.detach()
    assert torch.equal(fc1.weight_quantizer.amax, to_blocks(w, 16).abs().amax(-1))
    assert all(q.is_calibrated for _, q in quantizers(tiny_model))
    out = logits(tiny_model, tokens(3))
    assert torch.isfinite(out).all()


def test_quantization_changes_output_within_reason(tiny_model):
    ref = logits(tiny_model, tokens(3))
    apply_modes(tiny_model, [("quantize", INT8_CHANNEL)])
    calibrate(tiny_model, loop_over(tokens(1)))
    out = logits(tiny_model, tokens(3))
    err = (out - ref).norm() / ref.norm()
    assert 0 < err < 0.05


def test_bad_exclude_pattern_names_the_key(tiny_model):
    with pytest.raises(ConfigError, match=r"quant\.exclude\[1\]='\*linaer_fc2\*'"):
        apply_modes(tiny_model, [("quantize", {**W4A8_KV, "exclude": ["*output_layer*", "*linaer_fc2*"]})])


def test_exclude_pattern_keeps_layers_high_precision(tiny_model):
    apply_modes(tiny_model, [("quantize", {**INT8_CHANNEL, "exclude": ["*output_layer*", "decoder.layers.0.*"]})])
    assert type(tiny_model.decoder.layers[0].mlp.linear_fc2).__name__ == "RowParallelLinear"
    assert type(tiny_model.decoder.layers[1].mlp.linear_fc2).__name__ == "QuantRowParallelLinear"


@pytest.mark.parametrize("override,message", [
    ({"weight": {"format": "nvfp4", "granularity": "tensor"}}, r"quant\.weight\.granularity=tensor"),
    ({"input": {"format": "int8", "granularity": "channel"}}, r"quant\.input\.granularity=channel"),
    ({"input": {"format": "nf4", "granularity": "block"}}, r"quant\.input\.format=nf4"),
    ({"weight": {"format": "fp8_e4m3", "granularity": "block"}}, r"quant\.weight\.granularity=block"),
    ({"weight": None, "input": None, "kv_cache": None}, r"quant: weight, input and kv_cache are all null"),
])
def test_invalid_quant_configs_name_the_key(tiny_model, override, message):
    with pytest.raises(ConfigError, match=message):
        apply_modes(tiny_model, [("quantize", {**INT8_CHANNEL, **override})])


def test_mode_cannot_follow_itself(tiny_model):
    apply_modes(tiny_model, [("quantize", INT8_CHANNEL)])
    with pytest.raises(ModeError, match="cannot be applied after 'quantize'"):
        apply_modes(tiny_model, [("quantize", INT8_CHANNEL)])
    with pytest.raises(ModeError, match="unknown mode 'prune_heads'"):
        apply_modes(tiny_model, [("prune_heads", {})])


def test_restore_replays_and_state_dict_round_trip(tiny_model, megatron_tp1):
    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import TINY

    apply_modes(tiny_model, [("quantize", W4A8_KV)])
    calibrate(tiny_model, loop_over(tokens(1)))
    fresh = build_gpt_model(TINY)
    restore_modes(fresh, mode_state(tiny_model))
    assert not all(q.is_calibrated for _, q in quantizers(fresh))
    fresh.load_state_dict(tiny_model.state_dict())
    assert all(q.is_calibrated for _, q in quantizers(fresh))
    assert torch.equal(logits(fresh, tokens(4)), logits(tiny_model, tokens(4)))


def test_qat_gradients_flow_and_scales_are_buffers(tiny_model):
    apply_modes(tiny_model, [("quantize", W4A8_KV)])
    calibrate(tiny_model, loop_over(tokens(1)))
    fc1 = tiny_model.decoder.layers[0].mlp.linear_fc1
    assert "weight_quantizer._amax" in dict(fc1.named_buffers())
    assert not any("_amax" in n for n, _ in tiny_model.named_parameters())
    batch = tokens(2)
    loss = tiny_model(batch[:, :-1], torch.arange(15).expand(2, 15), None, labels=batch[:, 1:]).mean()
    loss.backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0
