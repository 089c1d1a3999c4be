"""Sparse exports: zeros in every format, the sparsity block in the configs, the validator's n:m
check (and its refusal of a broken pattern), a transformers reload of the bf16 export."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from nemo_quant.export.validate import validate_checkpoint
from nemo_quant.export.writer import export_checkpoint
from nemo_quant.modes import apply_modes
from nemo_quant.quantization.calibrate import calibrate
from nemo_quant.quantization.forward_loop import windows_forward_loop
from nemo_quant.sparsity import sparsify
from tests.quant_helpers import FP8_KV, INT8_SQ, NVFP4_KV, tokens, w4a8_awq
from tests.tiny_models import TINY

CALIB = tokens(10, 4, 16)
FORMATS = {"bf16": None, "fp8": FP8_KV, "int8_sq": INT8_SQ, "w4a8_awq": w4a8_awq(16), "nvfp4": NVFP4_KV}


def _export(model, tmp_path, quant):
    apply_modes(model, [("sparsity", {"method": "sparsegpt"})])
    sparsify(model, windows_forward_loop(CALIB))
    if quant is not None:
        apply_modes(model, [("quantize", quant)])
        calibrate(model, windows_forward_loop(CALIB))
    export_checkpoint(model, TINY, {"format": "both", "path": str(tmp_path / "out"), "inference_tp": 2})
    return tmp_path / "out"


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_sparse_export_declares_and_validates(tiny_model, tmp_path, fmt):
    out = _export(tiny_model, tmp_path, FORMATS[fmt])
    config = json.loads((out / "hf" / "config.json").read_text())
    block = config["sparsity_config"]
    assert block["sparsity_structure"] == "2:4" and block["format"] == "dense" and block["method"] == "sparsegpt"
    assert len(block["targets"]) == TINY.num_layers * 7 and "model.layers.3.mlp.down_proj" in block["targets"]
    trt = json.loads((out / "trtllm" / "config.json").read_text())["sparsity"]
    assert "transformer.layers.0.attention.qkv" in trt["targets"] and len(trt["targets"]) == TINY.num_layers * 5
    if FORMATS[fmt] is not None:
        nested = json.loads((out / "hf" / "hf_quant_config.json").read_text())
        assert nested["sparsity"] == block
    for sub in ("hf", "trtllm"):
        report = validate_checkpoint(out / sub)
        assert report.ok, report.errors


def _break_one_group(path, name):
    tensors = load_file(str(path))
    w = tensors[name].clone()
    flat = w.view(torch.uint8) if w.dtype in (torch.float8_e4m3fn, torch.int8) else w
    flat[0, :4] = torch.tensor([1, 1, 1, 1], dtype=flat.dtype) * (17 if flat.dtype == torch.uint8 else 1)
    tensors[name] = w
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("fmt,groups", [("bf16", 1), ("w4a8_awq", 2)])  # INT4: a byte packs rows 2j and 2j+1
def test_validator_rejects_a_broken_pattern(tiny_model, tmp_path, fmt, groups):
    out = _export(tiny_model, tmp_path, FORMATS[fmt])
    hf_file = next((out / "hf").glob("*.safetensors"))
    _break_one_group(hf_file, "model.layers.1.mlp.up_proj.weight")
    report = validate_checkpoint(out / "hf")
    assert any(f"model.layers.1.mlp.up_proj.weight breaks its 2:4 pattern in {groups} of" in e for e in report.errors), \
        report.errors
    _break_one_group(out / "trtllm" / "rank1.safetensors", "transformer.layers.2.mlp.proj.weight")
    report = validate_checkpoint(out / "trtllm")
    assert any("TP rank 1" in e and "transformer.layers.2.mlp.proj.weight breaks its 2:4" in e for e in report.errors)


def test_transformers_loads_the_sparse_bf16_export(tiny_model, tmp_path):
    transformers = pytest.importorskip("transformers")
    from tests.quant_helpers import logits

    out = _export(tiny_model, tmp_path, None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "hf"), torch_dtype=torch.float32)
    up = hf.model.layers[1].mlp.up_proj.weight
    assert ((up != 0).reshape(up.shape[0], -1, 4).sum(-1) <= 2).all()
    batch = tokens(11, 2, 16)
    ours = logits(tiny_model, batch)
    theirs = hf(batch).logits
    torch.testing.assert_close(theirs, ours, rtol=2e-2, atol=2e-2)  # bf16 export vs fp32 model
