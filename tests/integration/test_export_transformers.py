"""An independent consumer of the unified HF export: Hugging Face transformers loads the
unquantized checkpoint (config, safetensors, tokenizer) and computes the Megatron model's
logits."""
import torch

from nemo_quant.export import ExportConfig, export_checkpoint
from tests.quant_helpers import logits, tokens


def test_transformers_loads_the_export_and_agrees(megatron_tp1, tiny_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from nemo_quant.models.loading import load_model

    loaded = load_model(str(tiny_dir / "hf"))
    export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format="hf", path=str(tmp_path / "hf"), dtype="float32"),
                      loaded.tokenizer)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    batch = tokens(4)
    with torch.no_grad():
        theirs = hf(batch).logits
    torch.testing.assert_close(theirs, logits(loaded.model, batch), rtol=1e-4, atol=1e-4)
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Call me Ishmael. 1234"
    assert tok(text).input_ids == loaded.tokenizer.encode(text).ids
