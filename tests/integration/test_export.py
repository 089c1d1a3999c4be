"""Export of a TP=1 model, per format: spec manifests, validator, dequantized round trip,
TensorRT-LLM TP split rules, atomicity and early errors."""
import json

import pytest
import torch
from safetensors import safe_open

from nemo_quant.export import ExportConfig, ExportError, export_checkpoint
from nemo_quant.export.formats import unpack_e2m1, unpack_int4_rows
from nemo_quant.export.hf import HFWriter
from nemo_quant.export.reload import DequantizedSource, HFQuantizedCheckpoint, load_quantized_hf
from nemo_quant.export.validate import validate_checkpoint
from nemo_quant.models.megatron_layout import split_qkv
from nemo_quant.modes import apply_modes
from nemo_quant.quantization.calibrate import calibrate
from tests.quant_helpers import FP8_KV, INT8_SQ, NVFP4_KV, int4_awq, logits, loop_over, tokens, w4a8_awq
from tests.tiny_models import TINY

PRESETS = {
    "fp8_kv": FP8_KV,
    "fp8_gptq": {**FP8_KV, "name": "fp8_gptq", "gptq": {"enabled": True}},  # GPTQ'd weights: still plain FP8
    "int8_sq": INT8_SQ,
    "int4_awq": int4_awq(16, "awq_full"),
    "w4a8_awq": w4a8_awq(16),
    "nvfp4_kv": NVFP4_KV,
    "mixed": {"name": "mixed", "weight": {"format": "fp8_e4m3"}, "input": {"format": "fp8_e4m3"}, "overrides": [
        {"pattern": "decoder.layers.0.*", "weight": {"format": "nvfp4", "granularity": "block"},
         "input": {"format": "nvfp4", "granularity": "block"}},
        {"pattern": "decoder.layers.1.mlp.*"}]},  # high precision
    "none": None,
}
EXPECTED_ALGO = {"fp8_kv": "FP8", "fp8_gptq": "FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int4_awq": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ",
                 "nvfp4_kv": "NVFP4", "mixed": "MIXED_PRECISION", "none": None}
HF_PROJ = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]


def _quantized(model, preset):
    if preset is not None:
        apply_modes(model, [("quantize", preset)])
        calibrate(model, loop_over(tokens(0), tokens(1)))
    return model


def _fake_quant_weights(model) -> dict[str, torch.Tensor]:
    """What the fake-quant model computes with, per HF projection (split by the layout rules)."""
    out = {}
    for i, layer in enumerate(model.decoder.layers):
        for name, projs in (("self_attention.linear_qkv", HF_PROJ[:3]), ("self_attention.linear_proj", HF_PROJ[3:4]),
                            ("mlp.linear_fc1", HF_PROJ[4:6]), ("mlp.linear_fc2", HF_PROJ[6:])):
            m = layer.get_submodule(name)
            w = m.weight_quantizer(m.weight) if getattr(m, "weight_quantizer", None) is not None else m.weight
            w = w.detach()
            parts = split_qkv(w, TINY) if name.endswith("qkv") else w.chunk(2) if name.endswith("fc1") else (w,)
            for proj, part in zip(projs, parts):
                out[f"model.layers.{i}.{proj}"] = part
    return out


def export_presets(presets: dict, root, tiny_dir, **cfg) -> dict:
    """{name: (model, ExportResult)}: each preset quantized on a fresh TP=1 tiny model and exported."""
    from nemo_quant.models.loading import load_model

    done = {}
    for name, preset in presets.items():
        loaded = load_model(str(tiny_dir / "hf"))
        model = _quantized(loaded.model, preset)
        result = export_checkpoint(model, loaded.source.arch, ExportConfig(path=str(root / name), dtype="float32", **cfg),
                                   loaded.tokenizer)
        done[name] = (model, result)
    return done


@pytest.fixture(scope="module")
def exports(tmp_path_factory, megatron_tp1, tiny_dir):
    """Every preset exported (both formats, inference TP=2) from one TP=1 model each."""
    return export_presets(PRESETS, tmp_path_factory.mktemp("exports"), tiny_dir, format="both", inference_tp=2)


@pytest.mark.parametrize("name", list(PRESETS))
def test_export_validates_and_reports_its_algorithm(exports, name):
    model, result = exports[name]
    assert result.quant_algo == EXPECTED_ALGO[name]
    for sub in ("hf", "trtllm"):
        report = validate_checkpoint(result.path / sub)
        assert report.ok, report.errors
    hf_cfg = json.loads((result.path / "hf" / "config.json").read_text())
    assert (hf_cfg.get("quantization_config") or {}).get("quant_algo") == EXPECTED_ALGO[name]
    trt_cfg = json.loads((result.path / "trtllm" / "config.json").read_text())
    assert trt_cfg["quantization"]["quant_algo"] == EXPECTED_ALGO[name]
    assert trt_cfg["position_embedding_type"] == "rope_gpt_neox" and trt_cfg["mapping"]["tp_size"] == 2
    assert (result.path / "hf" / "tokenizer.json").is_file()


@pytest.mark.parametrize("name", list(PRESETS))
def test_dequantized_weights_equal_fake_quant_and_logits_match(exports, name):
    model, result = exports[name]
    source = DequantizedSource(HFQuantizedCheckpoint(result.path / "hf"))
    for hf_name, w in _fake_quant_weights(model).items():
        assert torch.equal(source.get(hf_name + ".weight"), w), hf_name
    rebuilt, _ = load_quantized_hf(result.path / "hf")
    batch = tokens(7)
    torch.testing.assert_close(logits(rebuilt, batch), logits(model, batch), rtol=1e-6, atol=1e-6)


def _raw(path, name):
    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name) if name in f.keys() else None


def _unpacked(t: torch.Tensor, algo: str | None):
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        return unpack_int4_rows(t.view(torch.uint8))
    if algo == "NVFP4":
        return unpack_e2m1(t)
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("name", ["fp8_kv", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4_kv"])
def test_trtllm_inference_tp2_splits_per_spec(exports, name):
    """Rank r: qkv = cat(q_r, k_r, v_r); dense/proj input columns r (block scales with them);
    fc = gate_proj rows r, gate = up_proj rows r; vocab rows padded to a multiple of 2."""
    _, result = exports[name]
    algo = EXPECTED_ALGO[name]
    hf_file = result.path / "hf" / "model.safetensors"
    d, nkv_r, nh_r = TINY.head_dim, TINY.num_query_groups // 2, TINY.num_attention_heads // 2
    for r in range(2):
        rank_file = result.path / "trtllm" / f"rank{r}.safetensors"
        for i in range(TINY.num_layers):
            hf = lambda proj, s: _raw(hf_file, f"model.layers.{i}.{proj}.{s}")  # noqa: E731
            trt = lambda mod, s: _raw(rank_file, f"transformer.layers.{i}.{mod}.{s}")  # noqa: E731
            w = {p: _unpacked(hf(p, "weight"), algo) for p in HF_PROJ}
            rows = lambda t, n: t[r * n:(r + 1) * n]  # noqa: E731
            cols = lambda t, n: t[:, r * n:(r + 1) * n]  # noqa: E731
            qkv = torch.cat([rows(w["self_attn.q_proj"], nh_r * d), rows(w["self_attn.k_proj"], nkv_r * d),
                             rows(w["self_attn.v_proj"], nkv_r * d)])
            assert torch.equal(_unpacked(trt("attention.qkv", "weight"), algo), qkv)
            assert torch.equal(_unpacked(trt("attention.dense", "weight"), algo), cols(w["self_attn.o_proj"], nh_r * d))
            assert torch.equal(_unpacked(trt("mlp.fc", "weight"), algo), rows(w["mlp.gate_proj"], TINY.ffn_hidden_size // 2))
            assert torch.equal(_unpacked(trt("mlp.gate", "weight"), algo), rows(w["mlp.up_proj"], TINY.ffn_hidden_size // 2))
            assert torch.equal(_unpacked(trt("mlp.proj", "weight"), algo), cols(w["mlp.down_proj"], TINY.ffn_hidden_size // 2))
            ws = trt("mlp.proj", "weights_scaling_factor")
            hf_ws = hf("mlp.down_proj", "weight_scale")
            if hf_ws.ndim == 2:  # blocks follow their columns
                assert torch.equal(ws.view(torch.uint8) if ws.dtype == torch.float8_e4m3fn else ws,
                                   cols(hf_ws, hf_ws.shape[1] // 2).contiguous().view(torch.uint8)
                                   if hf_ws.dtype == torch.float8_e4m3fn else cols(hf_ws, hf_ws.shape[1] // 2))
            if name.endswith("_kv"):
                k, v = hf("self_attn.k_proj", "k_scale"), hf("self_attn.v_proj", "v_scale")
                assert trt("attention", "kv_cache_scaling_factor").item() == max(k.item(), v.item())
        emb = _raw(result.path / "hf" / "model.safetensors", "model.embed_tokens.weight")
        padded = torch.cat([emb, emb.new_zeros(1, emb.shape[1])])  # 257 -> 258 rows
        assert torch.equal(_raw(rank_file, "transformer.vocab_embedding.weight"), padded.chunk(2)[r])
        assert torch.equal(_raw(rank_file, "lm_head.weight"), padded.chunk(2)[r])  # tied: lm_head = embedding


def test_mixed_precision_lists_every_quantized_layer(exports):
    _, result = exports["mixed"]
    quant = json.loads((result.path / "hf" / "hf_quant_config.json").read_text())["quantization"]
    layers = quant["quantized_layers"]
    assert layers["model.layers.0.self_attn.q_proj"] == {"quant_algo": "NVFP4", "group_size": 16}
    assert layers["model.layers.2.mlp.down_proj"] == {"quant_algo": "FP8"}
    assert "model.layers.1.mlp.up_proj" in quant["exclude_modules"] and "model.layers.1.mlp.up_proj" not in layers
    trt = json.loads((result.path / "trtllm" / "quant_cfg.json").read_text())
    assert trt["quantized_layers"]["transformer.layers.0.attention.qkv"]["quant_algo"] == "NVFP4"


def test_bf16_model_round_trip_is_exact(megatron_tp1, tiny_dir, tmp_path):
    from nemo_quant.models.loading import load_model

    loaded = load_model(str(tiny_dir / "hf"), "bfloat16")
    model = _quantized(loaded.model, PRESETS["w4a8_awq"])
    with torch.no_grad():  # Megatron keeps RMSNorm weights in fp32; the bf16 export rounds them
        for p in model.parameters():
            p.copy_(p.bfloat16())
    export_checkpoint(model, loaded.source.arch, ExportConfig(format="hf", path=str(tmp_path / "bf16")))
    assert validate_checkpoint(tmp_path / "bf16").ok
    rebuilt, _ = load_quantized_hf(tmp_path / "bf16", torch.bfloat16)
    torch.testing.assert_close(logits(rebuilt, tokens(3)), logits(model, tokens(3)), rtol=0, atol=0)


def test_hf_checkpoint_shards_by_size(megatron_tp1, tiny_dir, tmp_path):
    from nemo_quant.models.loading import load_model

    loaded = load_model(str(tiny_dir / "hf"))
    model = _quantized(loaded.model, PRESETS["int4_awq"])
    export_checkpoint(model, loaded.source.arch, ExportConfig(format="hf", path=str(tmp_path / "s"), dtype="float32",
                                                              max_shard_size_gb=40e3 / 2**30))
    files = sorted(p.name for p in (tmp_path / "s").glob("*.safetensors"))
    assert len(files) > 2 and files[0].startswith("model-00001-of-")
    assert validate_checkpoint(tmp_path / "s").ok
    rebuilt, _ = load_quantized_hf(tmp_path / "s")
    torch.testing.assert_close(logits(rebuilt, tokens(3)), logits(model, tokens(3)), rtol=1e-6, atol=1e-6)


def test_interrupted_export_leaves_nothing(megatron_tp1, tiny_dir, tmp_path, monkeypatch):
    from nemo_quant.models.loading import load_model

    loaded = load_model(str(tiny_dir / "hf"))
    model = _quantized(loaded.model, PRESETS["fp8_kv"])
    calls = {"n": 0}
    original = HFWriter.layer

    def failing_layer(self, layer):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full (injected)")
        return original(self, layer)

    monkeypatch.setattr(HFWriter, "layer", failing_layer)
    target = tmp_path / "ckpt"
    with pytest.raises(OSError, match="injected"):
        export_checkpoint(model, loaded.source.arch, ExportConfig(format="both", path=str(target)))
    assert calls["n"] == 3
    assert list(tmp_path.iterdir()) == []  # no target, no staging directory
    monkeypatch.undo()
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="export.path"):
        export_checkpoint(model, loaded.source.arch, ExportConfig(format="hf", path=str(target)))
    assert (target / "keep.txt").read_text() == "precious"


@pytest.mark.parametrize("preset,cfg,match", [
    ({"name": "r", "weight": {"format": "int4", "granularity": "block", "block_size": 48}}, {}, "block_size=48"),
    (PRESETS["fp8_kv"], {"format": "trtllm", "inference_tp": 3}, "inference_tp=3"),
    (PRESETS["fp8_kv"], {"format": "trtllm", "trtllm_architecture": "GPTForCausalLM"}, "LayerNorm"),
    ({"name": "mx", "weight": {"format": "mxfp8", "granularity": "block"}}, {}, "no deployable checkpoint"),
    ({"name": "kv4", "weight": {"format": "fp8_e4m3"}, "input": {"format": "fp8_e4m3"},
      "kv_cache": {"format": "nvfp4", "granularity": "block"}}, {}, "kv_cache"),
])
def test_bad_export_fails_before_writing(megatron_tp1, tiny_dir, tmp_path, preset, cfg, match):
    from nemo_quant.models.loading import load_model

    loaded = load_model(str(tiny_dir / "hf"))
    model = _quantized(loaded.model, preset)
    with pytest.raises(ExportError, match=match):
        export_checkpoint(model, loaded.source.arch, ExportConfig(path=str(tmp_path / "x"), **cfg))
    assert not (tmp_path / "x").exists()


def test_fewer_kv_heads_than_inference_tp_duplicates_them(exports, tmp_path):
    """TINY has 2 KV heads: at inference TP=4 ranks 2r and 2r+1 both hold KV head r, and the
    config keeps the true count."""
    model, _ = exports["fp8_kv"]
    export_checkpoint(model, TINY, ExportConfig(format="both", path=str(tmp_path / "tp4"), dtype="float32",
                                                inference_tp=4))
    assert validate_checkpoint(tmp_path / "tp4" / "trtllm").ok
    assert json.loads((tmp_path / "tp4" / "trtllm" / "config.json").read_text())["num_key_value_heads"] == 2
    hf_file = tmp_path / "tp4" / "hf" / "model.safetensors"
    k = _unpacked(_raw(hf_file, "model.layers.0.self_attn.k_proj.weight"), "FP8")
    q = _unpacked(_raw(hf_file, "model.layers.0.self_attn.q_proj.weight"), "FP8")
    d = TINY.head_dim
    for r in range(4):
        qkv = _unpacked(_raw(tmp_path / "tp4" / "trtllm" / f"rank{r}.safetensors",
                             "transformer.layers.0.attention.qkv.weight"), "FP8")
        assert torch.equal(qkv[:d], q[r * d:(r + 1) * d])  # one query head per rank
        head = r // 2
        assert torch.equal(qkv[d:2 * d], k[head * d:(head + 1) * d])
