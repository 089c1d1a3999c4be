"""TP=2 and PP=2 shards of the same checkpoint reproduce the TP=1 model."""
import pytest
import torch

from nemo_quant.runtime.spawn import run_distributed
from tests import workers

pytestmark = pytest.mark.distributed
TOKENS = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tp1_logits(tiny_dir):
    return run_distributed(workers.sharded_logits, 1, str(tiny_dir / "tiny.gguf"), 1, 1, TOKENS)[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_sharded_logits_match_tp1(tiny_dir, tp1_logits, tp, pp):
    outs = run_distributed(workers.sharded_logits, tp * pp, str(tiny_dir / "tiny.gguf"), tp, pp, TOKENS)
    last_stage = [o for o in outs if o is not None]
    assert len(last_stage) == tp
    for logits in last_stage:
        torch.testing.assert_close(logits, tp1_logits, rtol=1e-5, atol=1e-5)


def test_perplexity_identical_across_layouts(tiny_dir):
    windows = torch.randint(0, 257, (3, 12), generator=torch.Generator().manual_seed(1))
    path = str(tiny_dir / "hf")
    ref, = run_distributed(workers.sharded_perplexity, 1, path, 1, 1, windows)
    # TP=1 x DP=2: windows split across data-parallel ranks, sums all-reduced.
    dp = run_distributed(workers.sharded_perplexity, 2, path, 1, 1, windows)
    tp = run_distributed(workers.sharded_perplexity, 2, path, 2, 1, windows)
    for value in dp + tp:
        assert value == pytest.approx(ref, rel=1e-6)
