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
