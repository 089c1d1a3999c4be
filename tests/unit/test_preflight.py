"""The preflight refuses, before any forward pass, every job that would fail later: export
format vs quant format, ragged groups, inference TP vs heads and groups, KV-cache formats
without a layout, smoothing scales a format cannot hold, patterns that match nothing, mode
order; and it changes nothing in the model when it passes."""
import pytest

from nemo_quant.preflight import PreflightError, preflight
from tests.quant_helpers import FP8_KV, NVFP4_KV, W4A8_KV, int4_awq
from tests.tiny_models import TINY

HF = {"format": "hf", "path": "/nonexistent/never-written"}


def _refusal(model, modes, export, arch=TINY) -> str:
    with pytest.raises(PreflightError) as info:
        preflight(model, arch, modes, export)
    return str(info.value)


@pytest.mark.parametrize("quant, export, expected", [
    # Ragged INT4 groups: TINY's 64 inputs with groups of 128.
    (int4_awq(128), HF, "quant.weight.block_size=128"),
    # MX has no checkpoint layout.
    ({"name": "mx", "weight": {"format": "mxfp8", "granularity": "block"}, "input": {"format": "mxfp8", "granularity": "block"}},
     HF, "has no deployable checkpoint format"),
    # NVFP4 KV cache has no layout.
    ({**FP8_KV, "kv_cache": {"format": "nvfp4", "granularity": "block"}}, HF, "quant.kv_cache=nvfp4"),
    # Inference TP=3 cuts TINY's 4 heads / 2 groups.
    (FP8_KV, {"format": "trtllm", "path": "/x", "inference_tp": 3}, "inference_tp"),
    # Groups of 16 over fc2's 96 inputs split by inference TP=4 into 24-wide pieces.
    (W4A8_KV, {"format": "trtllm", "path": "/x", "inference_tp": 4}, "export.inference_tp=4 splits its input dim"),
    # SmoothQuant on FP8 writes pre-quant scales that FP8 checkpoints cannot hold.
    ({**FP8_KV, "algorithm": "smoothquant"}, HF, "quant.algorithm=max"),
    # A quantized output layer.
    ({**FP8_KV, "exclude": []}, HF, "output layer is quantized"),
    # export.path missing.
    (FP8_KV, {"format": "hf"}, "export.path is not set"),
])
def test_each_refusal_names_the_key_and_leaves_the_model_untouched(tiny_model, quant, export, expected):
    message = _refusal(tiny_model, [("quantize", quant)], export)
    assert expected in message
    assert not any(hasattr(m, "weight_quantizer") for m in tiny_model.modules())


def test_config_and_pattern_refusals(tiny_model):
    assert "quant.exclude[0]='*nope*'" in _refusal(tiny_model, [("quantize", {**FP8_KV, "exclude": ["*nope*"]})], None)
    assert "quant.weight.block_size=1" in _refusal(
        tiny_model, [("quantize", {"name": "b", "weight": {"format": "int4", "granularity": "block", "block_size": 1}})],
        None)
    assert "export.max_shard_size_gb" in _refusal(tiny_model, [], {**HF, "max_shard_size_gb": 0})
    assert "no such preset" in _refusal(
        tiny_model, [("quantize", {"name": "a", "auto": {"formats": ["nope"], "effective_bits": 8}})], None)


def test_auto_candidates_are_checked_against_the_export(tiny_model):
    auto = {"name": "auto", "auto": {"formats": ["nvfp4", "mxfp8"], "effective_bits": 10}}
    message = _refusal(tiny_model, [("quantize", auto)], HF)
    assert message.startswith("quant.auto.formats: mxfp8:")


def test_mode_order_is_refused_before_work(tiny_model):
    from nemo_quant.modes import apply_modes

    apply_modes(tiny_model, [("quantize", FP8_KV)])
    assert "cannot be applied after 'quantize'" in _refusal(tiny_model, [("quantize", FP8_KV)], None)


@pytest.mark.parametrize("quant", [FP8_KV, NVFP4_KV, int4_awq(16), W4A8_KV])
def test_exportable_jobs_pass_and_change_nothing(tiny_model, quant):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items() if v is not None and hasattr(v, "clone")}
    preflight(tiny_model, TINY, [("quantize", quant)], {**HF, "format": "both", "inference_tp": 2})
    after = tiny_model.state_dict()
    assert before.keys() == {k for k, v in after.items() if v is not None and hasattr(v, "clone")}
    assert all(before[k].equal(after[k]) for k in before)
    assert not any(hasattr(m, "weight_quantizer") for m in tiny_model.modules())
