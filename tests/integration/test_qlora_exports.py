"""The three QLoRA exports in their real consumers: transformers + bitsandbytes load the NF4
base, PEFT puts the adapter on it, and both reproduce our logits; the merged export loads in
transformers and is what `quantize` takes next; a bitsandbytes merge is refused in words."""
import json

import pytest
import torch

from nemo_quant.export import ExportConfig, ExportError, export_checkpoint
from nemo_quant.modes import apply_modes
from tests.qlora_helpers import hf_qlora_model, perturb_adapters
from tests.quant_helpers import logits, tokens

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def qtiny_dir(tmp_path_factory):
    from tests.tiny_models import QTINY, write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("qtiny") / "hf", QTINY)


@pytest.fixture
def qlora_model(megatron_tp1, qtiny_dir):
    from nemo_quant.models.loading import load_model

    loaded = load_model(str(qtiny_dir))
    apply_modes(loaded.model, [("qlora", {"rank": 8, "alpha": 16})])
    perturb_adapters(loaded.model)
    return loaded


def test_bitsandbytes_base_and_peft_adapter_reproduce_our_logits(qlora_model, qtiny_dir, tmp_path):
    import bitsandbytes.functional as bnb_functional
    from safetensors.torch import load_file

    from nemo_quant.models.sources import open_source

    loaded = qlora_model
    out = tmp_path / "peft"
    result = export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format="peft", path=str(out), dtype="float32"),
                               loaded.tokenizer)
    assert result.quant_algo.startswith("NF4")
    config = json.loads((out / "base" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    # the stored base is what bitsandbytes makes of the original weights, byte for byte
    stored = load_file(str(out / "base" / "model.safetensors"))
    source = open_source(qtiny_dir)
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight"):
        packed, state = bnb_functional.quantize_4bit(source.get(name).float(), blocksize=64, compress_statistics=True,
                                                     quant_type="nf4")
        assert torch.equal(stored[name], packed) and torch.equal(stored[name + ".absmax"], state.absmax)
        assert torch.equal(stored[name + ".nested_absmax"], state.state2.absmax)

    from nemo_quant.export.validate import validate_checkpoint

    report = validate_checkpoint(out)
    assert report.ok and report.kind == "bitsandbytes-nf4 + peft-adapter", report.errors
    base, peft_model = hf_qlora_model(out)
    batch = tokens(5)
    ours = logits(loaded.model, batch)
    with torch.no_grad():
        theirs = peft_model(batch).logits
        with peft_model.disable_adapter():
            base_only = peft_model(batch).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert (base_only - ours).abs().max() > 1e-2  # the adapter matters
    from nemo_quant.qlora.modules import lora_layers

    for _, m in lora_layers(loaded.model):
        m.lora_B.data.zero_()
    torch.testing.assert_close(base_only, logits(loaded.model, batch), rtol=1e-5, atol=1e-5)


def test_merged_export_loads_in_transformers_and_quantizes(qlora_model, tmp_path, caplog):
    from transformers import LlamaForCausalLM

    from nemo_quant.models.loading import load_model
    from nemo_quant.quantization.calibrate import calibrate
    from tests.quant_helpers import loop_over

    loaded = qlora_model
    out = tmp_path / "merged"
    export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format="merged", path=str(out), dtype="float32"),
                      loaded.tokenizer)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # the NF4 re-quantization warning, with its measured loss (the update is far below one NF4 step)
    warning = next(r.getMessage() for r in caplog.records if "re-quantizing this merge to NF4" in r.getMessage())
    lost = float(warning.split("= ")[1].split(" ")[0])
    assert 0.5 < lost
    batch = tokens(6)
    ours = logits(loaded.model, batch)
    hf = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(batch).logits, ours, rtol=1e-4, atol=1e-4)
    # QLoRA -> merge -> quantize: the merge is an ordinary model for the quantize mode
    merged = load_model(str(out))
    torch.testing.assert_close(logits(merged.model, batch), ours, rtol=1e-4, atol=1e-4)
    apply_modes(merged.model, [("quantize", {"name": "int8_wo", "weight": {"format": "int8", "granularity": "channel"}})])
    calibrate(merged.model, loop_over(batch))
    from nemo_quant.qlora.modules import lora_layers

    for _, m in lora_layers(loaded.model):
        m.lora_B.data.zero_()
    base_only = logits(loaded.model, batch)
    # the adapter's update survives INT8 quantization of the merge (it would not survive NF4)
    assert (logits(merged.model, batch) - ours).norm() < 0.2 * (base_only - ours).norm()


@pytest.mark.parametrize("fmt", ["hf", "trtllm", "compressed_tensors"])
def test_formats_that_would_drop_the_adapters_are_refused(qlora_model, tmp_path, fmt):
    loaded = qlora_model
    with pytest.raises(ExportError, match=f"export.format={fmt} would drop the model's LoRA adapters"):
        export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format=fmt, path=str(tmp_path / "x")))
    assert not (tmp_path / "x").exists()


def test_peft_export_of_a_model_without_adapters_is_refused(megatron_tp1, qtiny_dir, tmp_path):
    from nemo_quant.models.loading import load_model

    loaded = load_model(str(qtiny_dir))
    with pytest.raises(ExportError, match="export.format=peft writes LoRA adapters, and this model has none"):
        export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format="peft", path=str(tmp_path / "x")))


def test_validator_catches_a_damaged_qlora_export(qlora_model, tmp_path):
    from safetensors.torch import load_file, save_file

    from nemo_quant.export.validate import validate_checkpoint

    loaded = qlora_model
    out = tmp_path / "peft"
    export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format="peft", path=str(out)))
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    name = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    adapter[name] = adapter[name][:, :-64].contiguous()  # a wrong rank-split of the input dim
    save_file(adapter, str(out / "adapter" / "adapter_model.safetensors"))
    base = load_file(str(out / "base" / "model.safetensors"))
    del base["model.layers.0.self_attn.q_proj.weight.nested_absmax"]
    save_file(base, str(out / "base" / "model.safetensors"))
    report = validate_checkpoint(out)
    assert any("down_proj.lora_A.weight has shape [8, 320]" in e for e in report.errors), report.errors
    assert any("missing tensor model.layers.0.self_attn.q_proj.weight.nested_absmax" in e for e in report.errors)
