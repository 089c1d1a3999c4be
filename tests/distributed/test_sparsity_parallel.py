"""Sparsity at TP=2, PP=2 and DP=2 decides exactly what TP=1 decides (masks and reconstructed
weights), exports the same bytes, reshards through a dist checkpoint, and refuses a TP layout
that would split a group of m."""
import pytest
import torch

from nemo_quant.runtime.spawn import run_distributed
from tests import workers
from tests.quant_helpers import tokens

pytestmark = pytest.mark.distributed
CALIB = tokens(10, 4, 16)
METHODS = {"sparsegpt": {"method": "sparsegpt"}, "admm": {"method": "admm", "admm": {"iterations": 8}}}


@pytest.fixture(scope="module")
def tp1(tiny_dir, tmp_path_factory):
    """TP=1's result per method, computed once."""
    results = {}

    def get(method):
        if method not in results:
            out = tmp_path_factory.mktemp("tp1") / "hf"
            results[method] = run_distributed(workers.sparse_layout, 1, str(tiny_dir / "hf"), 1, 1, METHODS[method],
                                              CALIB, None, str(out))[0]
        return results[method]

    return get


@pytest.mark.parametrize("method,tp,pp,world", [("admm", 2, 1, 2), ("sparsegpt", 1, 2, 2), ("admm", 1, 1, 2)],
                         ids=["admm-tp2", "sparsegpt-pp2", "admm-dp2"])
def test_layouts_prune_like_tp1(tiny_dir, tmp_path, tp1, method, tp, pp, world):
    ref_state, ref_digests = tp1(method)
    outs = run_distributed(workers.sparse_layout, world, str(tiny_dir / "hf"), tp, pp, METHODS[method], CALIB, None,
                           str(tmp_path / "hf"))
    merged = {}
    for state, _ in outs:
        merged.update(state)
    assert set(merged) == set(ref_state) and len(ref_state) == 16
    for name, (weight, mask) in merged.items():
        ref_weight, ref_mask = ref_state[name]
        # TP and PP run TP=1's computation; DP's Hessian sum is exact (float64), whatever rank saw a batch.
        assert torch.equal(mask, ref_mask), name
        assert torch.equal(weight, ref_weight), name
    assert outs[0][1] == ref_digests  # byte-identical HF exports


def test_masks_survive_a_tp2_to_tp1_reshard(tiny_dir, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    saved = run_distributed(workers.sparse_layout, 2, str(tiny_dir / "hf"), 2, 1, {"method": "sparsegpt"}, CALIB, ckpt)
    restored, = run_distributed(workers.restored_sparse_state, 1, ckpt, 1)
    for name, (weight, mask) in saved[0][0].items():
        assert torch.equal(restored[name][1], mask), name
        assert torch.equal(restored[name][0], weight), name
        assert (restored[name][0][~mask] == 0).all()


def test_tp_split_of_a_group_is_refused_before_work(tiny_dir):
    # fc2 has 96 inputs: at TP=2 each rank holds 48, which splits groups of m=32.
    messages = run_distributed(workers.mode_preflight_message, 2, str(tiny_dir / "hf"), 2, "sparsity",
                               {"n": 16, "m": 32, "block_size": 128})
    assert messages[0] == messages[1]
    assert "splits a group of sparsity.m=32" in messages[0] and "parallel.tp" in messages[0]


def test_checkpoint_whose_weights_violate_its_masks_is_refused(tiny_dir, tmp_path):
    message, = run_distributed(workers.revived_weights_reload_message, 1, str(tiny_dir / "hf"), str(tmp_path / "ckpt"))
    assert "decoder.layers.2.self_attention.linear_proj" in message
    assert "nonzero where its sparsity mask is 0" in message and "re-run sparsify" in message
