"""Pruning and distillation at TP=2 and PP=2 against TP=1: the same decisions, the same weights
(HF exports byte-identical), layers moved between stages, checkpoints that reshard, the
vocab-parallel KL equal to TP=1's, and targets TP cannot split refused before work."""
import pytest
import torch

from nemo_quant.runtime.spawn import run_distributed
from tests import pruning_workers, workers

pytestmark = pytest.mark.distributed
TARGET = {"target": {"ffn_hidden_size": 64, "num_attention_heads": 2, "hidden_size": 48, "num_layers": 2}}
CALIB = (torch.arange(4 * 17).reshape(4, 17) * 37) % 257
EVALS = (torch.arange(2 * 17).reshape(2, 17) * 11 + 5) % 257


@pytest.fixture(scope="module")
def tp1(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1")
    return run_distributed(pruning_workers.prune_run, 1, str(tiny_dir / "hf"), 1, 1, TARGET, CALIB, EVALS, None,
                           str(out / "hf"))[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_layouts_decide_and_prune_like_tp1(tiny_dir, tmp_path, tp1, tp, pp):
    plan, want, digests = tp1
    outs = run_distributed(pruning_workers.prune_run, 2, str(tiny_dir / "hf"), tp, pp, TARGET, CALIB, EVALS,
                           str(tmp_path / "ck"), str(tmp_path / "hf"))
    assert all(o[0] == plan for o in outs)
    assert outs[0][2] == digests  # HF export byte-identical
    got = [o[1] for o in outs if o[1] is not None][-1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    resharded = run_distributed(workers.restored_logits, 1, str(tmp_path / "ck"), 1, EVALS)[0]
    torch.testing.assert_close(resharded, want, rtol=1e-5, atol=1e-5)


def test_depth_pruning_moves_layers_across_stages(tiny_dir, tp1):
    # both kept layers start on one stage, so one of them moves to the other
    layers = [2, 3] if tp1[0]["layers"] == [0, 1] else [0, 1]
    plan = dict(tp1[0], layers=layers)
    ref = run_distributed(pruning_workers.prune_run, 1, str(tiny_dir / "hf"), 1, 1, {"plan": plan}, CALIB, EVALS)[0]
    outs = run_distributed(pruning_workers.prune_run, 2, str(tiny_dir / "hf"), 1, 2, {"plan": plan}, CALIB, EVALS)
    torch.testing.assert_close(outs[1][1], ref[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ref[1], tp1[1])  # a different model than the importance-chosen layers


def test_vocab_parallel_kl_equals_tp1():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 256, generator=g) * 3, torch.randn(2, 5, 256, generator=g) * 3
    kl1, grad1 = run_distributed(pruning_workers.kl_on_shards, 1, student, teacher, 2.0, 250, 1)[0]
    kl2, grad2 = run_distributed(pruning_workers.kl_on_shards, 2, student, teacher, 2.0, 250, 2)[0]
    torch.testing.assert_close(kl2, kl1, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad2, grad1, rtol=0, atol=1e-6)
    s, t = student[..., :250] / 2, teacher[..., :250] / 2  # padded entries 250.. excluded
    ref = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl1, ref, rtol=1e-5, atol=1e-6)


def test_distillation_trains_alike_at_tp2_and_pp2(tiny_dir, tmp_path, tp1):
    windows = ((torch.arange(17) * 13) % 257).repeat(4, 1)  # one window again and again: the loss must fall
    args = (tp1[0], windows, 3)
    ref = run_distributed(pruning_workers.distill_steps, 1, str(tiny_dir / "hf"), 1, 1, *args, str(tmp_path / "a"), ["1:3"])[0]
    assert ref[-1] < ref[0]
    for tp, pp in ((2, 1), (1, 2)):
        got = run_distributed(pruning_workers.distill_steps, 2, str(tiny_dir / "hf"), tp, pp, *args,
                              str(tmp_path / f"b{tp}{pp}"), ["1:3"])[0]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target,match", [
    ({"ffn_hidden_size": 63}, "prune.target.ffn_hidden_size=63 is not divisible by parallel.tp=2"),
    ({"num_query_groups": 1}, "prune.target.num_query_groups=1 is not divisible by parallel.tp=2"),
])
def test_targets_tp_cannot_split_are_refused(tiny_dir, target, match):
    messages = run_distributed(pruning_workers.prune_message, 2, str(tiny_dir / "hf"), 2, 1, {"target": target})
    assert all(m is not None and match in m for m in messages)


def test_layer_count_pp_cannot_split_is_refused(tiny_dir):
    messages = run_distributed(pruning_workers.prune_message, 2, str(tiny_dir / "hf"), 1, 2, {"target": {"num_layers": 3}})
    assert all(m is not None and "prune.target.num_layers=3 is not divisible by parallel.pp=2" in m for m in messages)
