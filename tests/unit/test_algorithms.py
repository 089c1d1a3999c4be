"""SmoothQuant, AWQ and GPTQ on synthetic Megatron linear layers whose optimum is known."""
import pytest
import torch
from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import apply_modes
from nemo_quant.quantization.calibrate import calibrate
from nemo_quant.quantization.fake_quant import fake_quant

IN, OUT = 80, 48  # 80 = two blocks of 32 and a ragged one of 16


class OneLinear(nn.Module):
    """A bare Megatron Column- or RowParallelLinear ([seq, batch, in] -> [seq, batch, out])."""

    def __init__(self, seed: int, in_features: int = IN, out_features: int = OUT, row: bool = False):
        super().__init__()
        from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.transformer_config import TransformerConfig

        cfg = TransformerConfig(num_layers=1, hidden_size=in_features, num_attention_heads=1, use_cpu_initialization=True,
                                add_bias_linear=False, gradient_accumulation_fusion=False)
        torch.manual_seed(seed)
        if row:
            self.linear = RowParallelLinear(in_features, out_features, config=cfg, init_method=nn.init.normal_, bias=False,
                                            input_is_parallel=True, skip_bias_add=False)
        else:
            self.linear = ColumnParallelLinear(in_features, out_features, config=cfg, init_method=nn.init.normal_,
                                               bias=False, gather_output=False)

    def forward(self, x):
        return self.linear(x)[0]


def _inputs(seed: int, outlier: int | None = None, salient: int | None = None, tokens: int = 512) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 1, IN, generator=g)
    if outlier is not None:
        x[..., outlier] *= 60.0  # an activation outlier channel (SmoothQuant's case)
    if salient is not None:
        x[..., salient] = 8.0 + torch.rand(tokens, 1, generator=g)  # large, always-on (AWQ's case)
    return x


def _quantized(seed, cfg, calib, **kw):
    model = OneLinear(seed, **kw)
    reference = OneLinear(seed, **kw)
    apply_modes(model, [("quantize", {"name": "t", "exclude": [], **cfg})])
    calibrate(model, lambda m: [m(c) for c in calib])
    return model, reference


def _error(model, reference, x) -> float:
    with torch.no_grad():
        return float((model(x) - reference(x)).pow(2).sum())


W8A8 = {"weight": {"format": "int8", "granularity": "channel"}, "input": {"format": "int8"}}
W4_B32 = {"weight": {"format": "int4", "granularity": "block", "block_size": 32}}


def test_smoothquant_migrates_the_outlier_channel(megatron_tp1):
    calib, test = [_inputs(0, outlier=7)], _inputs(1, outlier=7)
    plain, ref = _quantized(0, {**W8A8, "algorithm": "max"}, calib)
    smooth, _ = _quantized(0, {**W8A8, "algorithm": "smoothquant"}, calib)
    p = smooth.linear.pre_quant_scale
    assert p[7] < 0.2 * p[torch.arange(IN) != 7].median()  # the outlier is divided down
    assert _error(smooth, ref, test) < 0.2 * _error(plain, ref, test)
    # the transformation itself is exact: without quantizers the layer computes x @ W^T
    for q in (smooth.linear.input_quantizer, smooth.linear.weight_quantizer):
        q.bypass = True
    torch.testing.assert_close(smooth(test), ref(test), rtol=1e-4, atol=1e-3)


def test_awq_protects_the_salient_channel(megatron_tp1):
    calib, test = [_inputs(2, salient=11)], _inputs(3, salient=11)
    rtn, ref = _quantized(0, {**W4_B32, "algorithm": "max"}, calib)
    awq, _ = _quantized(0, {**W4_B32, "algorithm": "awq_lite"}, calib)
    p = awq.linear.pre_quant_scale
    assert p[11] < p[torch.arange(IN) != 11].min()  # its weight column is scaled up the most
    assert _error(awq, ref, test) < 0.8 * _error(rtn, ref, test)


@pytest.mark.parametrize("seed", range(4))
def test_awq_clip_never_worse_than_rtn_on_calibration_data(megatron_tp1, seed):
    calib = [_inputs(seed)]
    rtn, ref = _quantized(seed, {**W4_B32, "algorithm": "max"}, calib)
    clip, _ = _quantized(seed, {**W4_B32, "algorithm": "awq_clip"}, calib)
    amax_rtn, amax_clip = rtn.linear.weight_quantizer.amax, clip.linear.weight_quantizer.amax
    assert amax_clip.shape == (OUT, 3)  # ragged last block
    assert bool((amax_clip <= amax_rtn + 1e-6).all()) and bool((amax_clip < amax_rtn).any())
    assert _error(clip, ref, calib[0]) < _error(rtn, ref, calib[0])


FP8_W = {"weight": {"format": "fp8_e4m3", "granularity": "tensor"}}


@pytest.mark.parametrize("weights, gain", [(W4_B32, 0.7), (FP8_W, 0.85)], ids=["int4", "fp8"])
@pytest.mark.parametrize("seed", range(5))
def test_gptq_lowers_output_error_vs_round_to_nearest(megatron_tp1, seed, weights, gain):
    # Correlated inputs: where GPTQ's error compensation has something to exploit.
    mix = torch.randn(IN, IN, generator=torch.Generator().manual_seed(100 + seed))
    calib = [_inputs(seed, tokens=1024) @ mix]
    test = _inputs(seed + 50, tokens=1024) @ mix
    rtn, ref = _quantized(seed, {**weights, "algorithm": "max"}, calib)
    gptq, _ = _quantized(seed, {**weights, "algorithm": "max", "gptq": {"enabled": True, "block_size": 16}}, calib)
    assert _error(gptq, ref, calib[0]) < gain * _error(rtn, ref, calib[0])
    assert _error(gptq, ref, test) < _error(rtn, ref, test)
    # the model's quantizer reproduces the GPTQ result: stored weights are on the grid
    wq = gptq.linear.weight_quantizer
    torch.testing.assert_close(fake_quant(gptq.linear.weight, wq.spec, wq.amax), gptq.linear.weight, rtol=0, atol=0)
    # same scales as RTN (static groups): GPTQ moves values, not the grid
    torch.testing.assert_close(wq.amax, rtn.linear.weight_quantizer.amax)


@pytest.mark.parametrize("row", [False, True], ids=["column", "row"])
def test_awq_then_gptq_beats_each_alone(megatron_tp1, row):
    mix = torch.randn(IN, IN, generator=torch.Generator().manual_seed(7)) * 0.3 + torch.eye(IN)
    calib, test = [_inputs(4, salient=3, tokens=1024) @ mix], _inputs(5, salient=3, tokens=1024) @ mix
    errors = {}
    for name, cfg in {"rtn": {"algorithm": "max"}, "awq": {"algorithm": "awq_full"},
                      "awq+gptq": {"algorithm": "awq_full", "gptq": {"enabled": True}}}.items():
        model, ref = _quantized(0, {**W4_B32, **cfg}, calib, row=row)
        errors[name] = _error(model, ref, test)
    assert errors["awq+gptq"] < errors["awq"] < errors["rtn"]


def test_memory_budget_splits_passes_without_changing_results(tiny_model):
    from tests.quant_helpers import logits, loop_over, tokens

    state = {k: v.clone() for k, v in tiny_model.state_dict().items() if isinstance(v, torch.Tensor)}
    cfg = {"name": "t", "algorithm": "awq_full", **W4_B32}  # GPTQ alone would see earlier groups already quantized
    passes = []
    apply_modes(tiny_model, [("quantize", cfg)])
    calibrate(tiny_model, lambda m: (passes.append(1), loop_over(tokens(1), tokens(2))(m)))
    one_pass = logits(tiny_model, tokens(3))

    from nemo_quant.models.builder import build_gpt_model
    from tests.tiny_models import TINY

    split = build_gpt_model(TINY)
    split.load_state_dict(state, strict=False)
    apply_modes(split, [("quantize", {**cfg, "search": {"memory_gib": 1e-4}})])
    split_passes = []
    calibrate(split, lambda m: (split_passes.append(1), loop_over(tokens(1), tokens(2))(m)))
    assert len(passes) == 1 and len(split_passes) > 4  # ~100 KiB per layer: one group each
    torch.testing.assert_close(logits(split, tokens(3)), one_pass, rtol=1e-5, atol=1e-5)


def test_smoothing_folds_into_norms_and_keeps_the_function(tiny_model):
    from tests.quant_helpers import logits, loop_over, tokens

    before = logits(tiny_model, tokens(3))
    norm_before = tiny_model.decoder.layers[0].input_layernorm.weight.clone()
    apply_modes(tiny_model, [("quantize", {"name": "sq", "algorithm": "smoothquant", **W8A8})])
    calibrate(tiny_model, loop_over(tokens(1), tokens(2)))
    layer = tiny_model.decoder.layers[0]
    assert torch.equal(layer.self_attention.linear_qkv.pre_quant_scale, torch.ones(64))
    assert not torch.equal(layer.input_layernorm.weight, norm_before)  # folded into the norm
    assert not torch.equal(layer.mlp.linear_fc2.pre_quant_scale, torch.ones(96))  # kept on the layer
    from nemo_quant.quantization.algorithms.observe import bypassed_quantizers

    with bypassed_quantizers(tiny_model):
        torch.testing.assert_close(logits(tiny_model, tokens(3)), before, rtol=1e-4, atol=1e-4)
    with pytest.raises(Exception, match="already holds a pre-quant scale"):
        calibrate(tiny_model, loop_over(tokens(1)))


@pytest.mark.parametrize("cfg,match", [
    ({"algorithm": "awq_full", "weight": {"format": "nvfp4", "granularity": "block"}}, "awq_lite"),
    ({"algorithm": "max", "weight": {"format": "nvfp4", "granularity": "block"}, "gptq": {"enabled": True}}, "gptq.enabled"),
    ({"algorithm": "smoothquant", "input": {"format": "int8"}}, "quant.weight"),
    ({"algorithm": "awq_lite", **W4_B32, "search": {"clip_min": 0.0}}, "clip_min"),
])
def test_bad_algorithm_configs_fail_before_any_work(tiny_model, cfg, match):
    with pytest.raises(ConfigError, match=match):
        apply_modes(tiny_model, [("quantize", {"name": "bad", **cfg})])


def test_fold_order_visits_each_fold_source_first():
    from nemo_quant.quantization.algorithms.fold import fold_order

    names = ["decoder.layers.0.self_attention.linear_proj", "decoder.layers.0.self_attention.linear_qkv",
             "decoder.layers.0.mlp.linear_fc1", "decoder.layers.0.mlp.linear_fc2",
             "decoder.layers.1.self_attention.linear_qkv", "decoder.layers.1.mlp.linear_fc1"]
    ordered = [n for n, _ in fold_order([(n, None) for n in names])]
    assert ordered == [names[0], names[1], names[3], names[2], names[4], names[5]]
    assert [n for n, _ in fold_order([(n, None) for n in ordered])] == ordered  # already in order: unchanged


def test_folding_into_a_calibrated_layer_is_refused(tiny_model):
    """A visiting-order bug (folding into a layer whose scales are already decided) fails loudly."""
    from nemo_quant.quantization.algorithms.fold import fold_into_previous, fold_target
    from nemo_quant.quantization.algorithms.linear_view import LinearView

    apply_modes(tiny_model, [("quantize", {"name": "w", "weight": {"format": "int8", "granularity": "channel"}})])
    calibrate(tiny_model, None)  # weight-only: every weight quantizer calibrated from the weights
    name = "decoder.layers.0.mlp.linear_fc2"
    fc2 = tiny_model.get_submodule(name)
    with pytest.raises(RuntimeError, match="fold_order"):
        fold_into_previous(LinearView(name, fc2), fold_target(tiny_model, name), torch.ones(fc2.input_size))
