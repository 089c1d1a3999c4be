"""The real SmolLM2-135M: Megatron import vs the independent reference, at TP=1 and TP=3."""
import pytest
import torch

from nemo_quant.models.reference_llama import ReferenceLlama
from nemo_quant.models.sources import GGUFSource
from nemo_quant.runtime.spawn import run_distributed
from tests import workers

pytestmark = [pytest.mark.real_model, pytest.mark.distributed]


@pytest.fixture(scope="module")
def prompt_tokens(smollm2_path):
    from nemo_quant.models.tokenizer import tokenizer_from_gguf

    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    return torch.tensor([tokenizer_from_gguf(smollm2_path).encode(text).ids])


@pytest.fixture(scope="module")
def reference_logits(smollm2_path, prompt_tokens):
    return ReferenceLlama(GGUFSource(smollm2_path)).logits(prompt_tokens)


@pytest.mark.parametrize("tp", [1, 3])
def test_megatron_matches_reference(smollm2_path, prompt_tokens, reference_logits, tp):
    outs = run_distributed(workers.sharded_logits, tp, str(smollm2_path), tp, 1, prompt_tokens, timeout_s=400)
    for logits in outs:
        assert logits.shape == reference_logits.shape
        # 30 fp32 layers, different summation orders: 5e-4 on logits of magnitude ~30.
        torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=5e-4)


def test_greedy_continuation_names_paris(smollm2_path):
    text, = run_distributed(workers.greedy_continuation, 1, str(smollm2_path), "The capital of France is", 6)
    assert "Paris" in text[len("The capital of France is"):], text


def test_smollm2_prunes_alike_at_tp1_and_tp3(smollm2_path, prompt_tokens, tmp_path):
    """Width (FFN, heads within groups, embedding channels) and depth at once: the same plan and a
    byte-identical HF export from TP=1 and TP=3, and transformers reproduces the pruned logits."""
    from transformers import LlamaForCausalLM

    from tests import pruning_workers

    calib = torch.cat([prompt_tokens[:, :16] + i for i in range(4)])  # 4 short windows: decisions only
    # 480 = 6 x 80: transformers refuses a hidden size that is not a multiple of the head count
    target = {"target": {"num_layers": 24, "ffn_hidden_size": 1152, "num_attention_heads": 6, "hidden_size": 480},
              "channel_score": "output"}
    outs = {tp: run_distributed(pruning_workers.prune_run, tp, str(smollm2_path), tp, 1, target, calib, prompt_tokens,
                                None, str(tmp_path / f"tp{tp}"), "float32", timeout_s=600) for tp in (1, 3)}
    plan1, logits1, digests1 = outs[1][0]
    assert all(o[0] == plan1 for o in outs[3]) and outs[3][0][2] == digests1
    torch.testing.assert_close(outs[3][0][1], logits1, rtol=1e-4, atol=5e-4)
    assert plan1["sizes"]["num_query_groups"] == 3 and all(len(h) == 6 for h in plan1["heads"])
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "tp1", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(prompt_tokens).logits
    torch.testing.assert_close(theirs, logits1, rtol=1e-4, atol=5e-4)  # fp32 export, summation order only
