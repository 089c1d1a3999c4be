"""compressed-tensors export of a TP=1 model, per format: our validator, compressed-tensors' own
config parser and decompressors (the library vLLM reads it with), our reader's round trip,
the folded smoothing scales, and the refusals (before any work)."""
import json

import pytest
import torch
from safetensors import safe_open

from nemo_quant.export import ExportConfig, ExportError, export_checkpoint
from nemo_quant.export.compressed_tensors import pack_int32, unpack_int32
from nemo_quant.export.reload import DequantizedSource, HFQuantizedCheckpoint, load_quantized_hf
from nemo_quant.export.validate import validate_checkpoint
from tests.integration.test_export import HF_PROJ, _fake_quant_weights, _quantized, export_presets
from tests.quant_helpers import FP8_KV, INT8_SQ, int4_awq, logits, tokens

FOLD = {"fold_all_scales": True}
PRESETS = {
    "w4a16_awq": {**int4_awq(16, "awq_full"), "search": FOLD, "kv_cache": {"format": "fp8_e4m3"}},
    "w4a16_gptq": {"name": "gptq", "weight": {"format": "int4", "granularity": "block", "block_size": 32},
                   "gptq": {"enabled": True}},
    "w8a16": {"name": "w8a16", "weight": {"format": "int8", "granularity": "channel"}},
    "w8a8_sq": {**INT8_SQ, "search": FOLD},
    "fp8_kv": FP8_KV,
    "mixed": {**FP8_KV, "name": "mixed", "overrides": [
        {"pattern": "decoder.layers.0.*", "weight": {"format": "int4", "granularity": "block", "block_size": 16}},
        {"pattern": "decoder.layers.1.mlp.*"}]},  # high precision
}
FORMATS = {"w4a16_awq": "pack-quantized", "w4a16_gptq": "pack-quantized", "w8a16": "pack-quantized",
           "w8a8_sq": "int-quantized", "fp8_kv": "float-quantized", "mixed": "mixed-precision"}


def _load(tiny_dir):
    from nemo_quant.models.loading import load_model

    return load_model(str(tiny_dir / "hf"))


@pytest.fixture(scope="module")
def ct_exports(tmp_path_factory, megatron_tp1, tiny_dir):
    return export_presets(PRESETS, tmp_path_factory.mktemp("ct"), tiny_dir, format="compressed_tensors")


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_export_validates_and_declares_its_scheme(ct_exports, name):
    from compressed_tensors.quantization import QuantizationConfig

    _, result = ct_exports[name]
    report = validate_checkpoint(result.path)
    assert report.ok and report.kind == "compressed-tensors", report.errors
    qc = json.loads((result.path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == FORMATS[name]
    parsed = QuantizationConfig.model_validate(qc)  # compressed-tensors' own schema
    assert len(parsed.config_groups) == (2 if name == "mixed" else 1)
    assert (parsed.kv_cache_scheme is not None) == (name in ("w4a16_awq", "fp8_kv", "mixed"))
    assert not (result.path / "hf_quant_config.json").exists()


def _decompressed_by_compressed_tensors(path, qc) -> dict[str, torch.Tensor]:
    """Every quantized linear's weight as compressed-tensors' decompressors compute it."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    from nemo_quant.export.validate_ct import CTConfig

    tensors, ct, out = _tensors(path), CTConfig(qc, []), {}
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.split(".")[-2] in {p.split(".")[-1] for p in HF_PROJ}}
    for module in sorted(modules):
        group = ct.group_of(module)
        if group is None:
            continue
        body = qc["config_groups"][group.name]
        scheme = QuantizationScheme(targets=body["targets"], weights=body["weights"],
                                    input_activations=body["input_activations"])
        local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
        compressor = BaseCompressor.get_value_from_registry(group.format)
        out[module] = compressor.decompress(local, scheme)["weight"].float()
    return out


@pytest.mark.parametrize("name", list(PRESETS))
def test_compressed_tensors_decompresses_our_fake_quant_weights(ct_exports, name):
    model, result = ct_exports[name]
    qc = json.loads((result.path / "config.json").read_text())["quantization_config"]
    theirs = _decompressed_by_compressed_tensors(result.path, qc)
    ours = _fake_quant_weights(model)
    assert theirs, "no quantized module found"
    for module, w in theirs.items():
        assert torch.equal(w, ours[module]), module
    if name == "mixed":
        assert "model.layers.1.mlp.up_proj" not in theirs and "model.layers.0.self_attn.q_proj" in theirs


@pytest.mark.parametrize("name", list(PRESETS))
def test_reader_round_trip_is_exact(ct_exports, name):
    model, result = ct_exports[name]
    source = DequantizedSource(HFQuantizedCheckpoint(result.path))
    for hf_name, w in _fake_quant_weights(model).items():
        assert torch.equal(source.get(hf_name + ".weight"), w), hf_name
    rebuilt, _ = load_quantized_hf(result.path)
    torch.testing.assert_close(logits(rebuilt, tokens(7)), logits(model, tokens(7)), rtol=1e-6, atol=1e-6)


def test_int32_packing_is_compressed_tensors_layout():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 64), generator=g, dtype=torch.int8)
        ours = pack_int32(codes, bits)
        assert torch.equal(ours, pack_to_int32(codes, bits))
        assert torch.equal(unpack_int32(ours, bits, 64), codes)
        assert torch.equal(unpack_from_int32(ours, bits, torch.Size([6, 64])), codes)


def test_llm_compressor_style_regex_targets_are_read(ct_exports, tmp_path):
    """A checkpoint whose groups target `re:` patterns (as llm-compressor writes) reads the same."""
    import shutil

    model, result = ct_exports["mixed"]
    copy = tmp_path / "regex"
    shutil.copytree(result.path, copy)
    config = json.loads((copy / "config.json").read_text())
    groups = config["quantization_config"]["config_groups"]
    for body in groups.values():
        layers = sorted({t.split(".")[2] for t in body["targets"]})
        body["targets"] = [f"re:model\\.layers\\.({'|'.join(layers)})\\..*_proj$"]
    ignore = config["quantization_config"]["ignore"]
    config["quantization_config"]["ignore"] = ["lm_head", "re:model\\.layers\\.1\\.mlp\\..*"]
    assert sorted(ignore) == sorted(["lm_head"] + [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")])
    (copy / "config.json").write_text(json.dumps(config))
    assert validate_checkpoint(copy).ok
    rebuilt, _ = load_quantized_hf(copy)
    torch.testing.assert_close(logits(rebuilt, tokens(7)), logits(model, tokens(7)), rtol=1e-6, atol=1e-6)


def test_folded_smoothing_leaves_the_function_unchanged(megatron_tp1, tiny_dir):
    """With quantizers bypassed, a model whose smoothing scales were folded into v/up rows (and
    the norms) computes what the original computes: the fold moves scales, it changes nothing."""
    from nemo_quant.quantization.algorithms.observe import bypassed_quantizers

    reference = logits(_load(tiny_dir).model, tokens(5))
    for preset in (PRESETS["w4a16_awq"], PRESETS["w8a8_sq"]):
        model = _quantized(_load(tiny_dir).model, preset)
        for name, module in model.named_modules():
            pqs = getattr(module, "pre_quant_scale", None)
            assert pqs is None or bool((pqs == 1).all()), f"{name} kept a pre-quant scale"
        qkv = model.decoder.layers[0].self_attention.linear_qkv.weight  # V rows carry o_proj's folded scale
        assert not torch.equal(qkv, _load(tiny_dir).model.decoder.layers[0].self_attention.linear_qkv.weight)
        with bypassed_quantizers(model):
            torch.testing.assert_close(logits(model, tokens(5)), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset,match", [
    ({"name": "nv", "weight": {"format": "nvfp4", "granularity": "block"},
      "input": {"format": "nvfp4", "granularity": "block"}}, "export.format=hf"),
    ({**int4_awq(16), "input": {"format": "fp8_e4m3"}}, "export.format=hf"),  # W4A8
    (int4_awq(16), "quant.search.fold_all_scales=true"),  # o_proj / down_proj smoothing left on the layer
    (INT8_SQ, "quant.search.fold_all_scales=true"),
])
def test_preflight_refuses_before_any_work(megatron_tp1, tiny_dir, tmp_path, preset, match):
    from nemo_quant.preflight import PreflightError, preflight

    loaded = _load(tiny_dir)
    with pytest.raises(PreflightError, match=match.replace(".", r"\.")):
        preflight(loaded.model, loaded.source.arch, [("quantize", preset)],
                  ExportConfig(format="compressed_tensors", path=str(tmp_path / "x")))
    model = _quantized(loaded.model, preset)  # and the export itself refuses the calibrated model
    with pytest.raises(ExportError, match=match.replace(".", r"\.")):
        export_checkpoint(model, loaded.source.arch, ExportConfig(format="compressed_tensors", path=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()
