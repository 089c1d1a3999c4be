"""The preflight under PP=2 and TP=2: a problem only one pipeline stage can see (an override on
its layer) fails every rank with the same message, and a good job passes on every rank."""
import pytest

from nemo_quant.runtime.spawn import run_distributed
from tests import workers
from tests.quant_helpers import int4_awq

pytestmark = pytest.mark.distributed
# Layer 3 (on the second stage at PP=2) gets ragged groups of 128 over its 96 fc2 inputs.
RAGGED_ON_LAST_STAGE = {**int4_awq(16), "overrides": [
    {"pattern": "decoder.layers.3.mlp.linear_fc2", "weight": {"format": "int4", "granularity": "block", "block_size": 128}}]}
HF = {"format": "hf", "path": "/nonexistent/never-written"}


@pytest.mark.parametrize("tp, pp", [(1, 2), (2, 1)])
def test_a_problem_seen_by_one_stage_fails_every_rank(tiny_dir, tp, pp):
    messages = run_distributed(workers.preflight_message, 2, str(tiny_dir / "hf"), tp, pp, RAGGED_ON_LAST_STAGE, HF)
    assert len(set(messages)) == 1 and messages[0] is not None
    assert messages[0].startswith("decoder.layers.3.mlp.linear_fc2") and "block_size=128" in messages[0]


def test_a_good_job_passes_on_every_rank(tiny_dir):
    assert run_distributed(workers.preflight_message, 2, str(tiny_dir / "hf"), 1, 2, int4_awq(16), HF) == [None, None]
