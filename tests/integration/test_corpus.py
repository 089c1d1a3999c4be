"""The real Austen corpus and the real SmolLM2 tokenizer feed exactly the benchmark's tokens."""
import pytest

from nemo_quant.data import austen
from nemo_quant.data.windows import fingerprint, token_windows
from nemo_quant.models.tokenizer import tokenizer_from_gguf

pytestmark = pytest.mark.real_model

# BENCHMARKS.md: characters per novel (janeaustenr 1.0.0-1).
CHARS = {"sensesensibility": 673687, "prideprejudice": 684767, "mansfieldpark": 883278,
         "emma": 883027, "northangerabbey": 433410, "persuasion": 466853}


def test_novels_decode_to_published_sizes():
    texts = austen.novels()
    assert list(texts) == list(austen.NOVELS)
    assert {k: len(v) for k, v in texts.items()} == CHARS


def test_benchmark_windows_fingerprints(smollm2_path):
    tok = tokenizer_from_gguf(smollm2_path)
    calib = token_windows(tok.encode(austen.calibration_text()).ids, 32, 512)
    evals = token_windows(tok.encode(austen.evaluation_text()).ids, 32, 512)
    assert fingerprint(calib) == "c25d8ad7e90ef65a"
    assert calib[0, :8].tolist() == [67, 19152, 7485, 334, 2680, 9114, 50, 23398]
    assert fingerprint(evals) == "0dc37fe702a9dfb0"
    assert len(tok.encode(austen.evaluation_text()).ids) == 115861


def test_too_few_tokens_names_the_key():
    with pytest.raises(ValueError, match="data.eval_samples"):
        token_windows(list(range(100)), 2, 64, what="evaluation")
