"""Distributed calibration (DESIGN.md rules): PP, DP, resharding, empty and failing ranks."""
import time

import pytest
import torch

from nemo_quant.runtime.spawn import run_distributed
from tests import workers
from tests.quant_helpers import INT4_BLOCK32_MSE, INT8_CHANNEL, tokens

pytestmark = pytest.mark.distributed
CALIB, EVALS = tokens(10, 4, 16), tokens(11, 2, 16)
INT8_KV = {**INT8_CHANNEL, "name": "int8_kv", "kv_cache": {"format": "int8"}}


@pytest.fixture(scope="module")
def tp1(tiny_dir):
    return run_distributed(workers.calibrate_layout, 1, str(tiny_dir / "hf"), 1, 1, INT8_KV, CALIB, EVALS)[0]


def _assert_logits_match(out, ref, exact: bool):
    """With three quantizers in a row, TP's different fp32 summation order can move a value
    across a rounding boundary (each pair alone matches to 1e-5); TP runs are compared in norm
    once their scales were checked to be identical."""
    if exact:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:
        assert (out - ref).norm() / ref.norm() < 2e-2


def _assert_same_amax(got: dict, ref: dict, names=None, exact: bool = True):
    for name in names or got:
        if exact:  # calibration is layout-invariant to the bit (README, "Layout-invariant calibration")
            assert torch.equal(got[name], ref[name]), name
        else:
            torch.testing.assert_close(got[name], ref[name], rtol=1e-6, atol=0, msg=name)


# Histogram and search calibrators on weights and inputs: whole-tensor statistics at any TP.
FP8_DISTRIBUTION = {"name": "fp8_dist", "weight": {"format": "fp8_e4m3", "calibrator": "mse"},
                    "input": {"format": "fp8_e4m3", "calibrator": "percentile", "percentile": 99.9}}


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_distribution_calibrators_equal_tp1_bit_for_bit(tiny_dir, tp, pp):
    _, ref = run_distributed(workers.calibrate_layout, 1, str(tiny_dir / "hf"), 1, 1, FP8_DISTRIBUTION, CALIB, EVALS)[0]
    outs = run_distributed(workers.calibrate_layout, tp * pp, str(tiny_dir / "hf"), tp, pp, FP8_DISTRIBUTION, CALIB,
                           EVALS, timeout_s=300)
    seen = {}
    for _, amax in outs:
        seen.update(amax)
    assert seen.keys() == ref.keys()
    _assert_same_amax(seen, ref)  # every amax is per tensor here: replicated, comparable as a whole


@pytest.mark.parametrize("tp,pp,world", [(1, 2, 2), (1, 1, 2), (2, 1, 2), (2, 1, 4)], ids=["pp2", "dp2", "tp2", "tp2xdp2"])
def test_layouts_calibrate_like_tp1(tiny_dir, tp1, tp, pp, world):
    ref_logits, ref_amax = tp1
    outs = run_distributed(workers.calibrate_layout, world, str(tiny_dir / "hf"), tp, pp, INT8_KV, CALIB, EVALS, timeout_s=300)
    for out, amax in outs:
        # replicated statistics (per-tensor inputs, K/V, row-parallel per-channel) equal TP=1's
        replicated = [n for n in amax if amax[n].ndim == 0 or "linear_proj" in n or "linear_fc2" in n]
        _assert_same_amax(amax, ref_amax, replicated if tp > 1 else None, exact=world == tp * pp)
        if out is not None:
            _assert_logits_match(out, ref_logits, exact=tp == 1)


SQ = {"name": "sq", "algorithm": "smoothquant", "weight": {"format": "int8", "granularity": "channel"},
      "input": {"format": "int8"}, "search": {"token_stride": 2}}
AWQ = {"name": "awq", "algorithm": "awq_full", "weight": {"format": "int4", "granularity": "block", "block_size": 32},
       "search": {"token_stride": 2}}
# GPTQ feeds each rounding decision into the next columns: equal inputs (canonical GEMMs) and
# TP=1's computation on every rank make its weights equal TP=1's too, bit for bit.
AWQ_GPTQ = {**AWQ, "name": "awq_gptq", "gptq": {"enabled": True, "block_size": 32}}


@pytest.fixture(scope="module")
def algorithm_tp1(tiny_dir):
    return {name: run_distributed(workers.algorithm_layout, 1, str(tiny_dir / "hf"), 1, 1, cfg, CALIB, EVALS)[0]
            for name, cfg in (("sq", SQ), ("awq", AWQ), ("awq_gptq", AWQ_GPTQ))}


LAYOUTS = {"tp2": (2, 1, 2), "pp2": (1, 2, 2), "tp2xdp2": (2, 1, 4)}


@pytest.mark.parametrize("algo,layout", [(a, lay) for a in ("sq", "awq") for lay in LAYOUTS] + [("awq_gptq", "tp2")])
def test_algorithms_decide_like_tp1(tiny_dir, algorithm_tp1, algo, layout):
    """SmoothQuant / AWQ(+clip, +GPTQ) scale searches agree across TP, PP and DP: pre-quant
    scales, folded norms and every amax, gathered, equal TP=1's (bit for bit without DP; DP
    pools its statistics in another order, so there to 1e-4)."""
    ref_logits, ref_state = algorithm_tp1[algo]
    tp, pp, world = LAYOUTS[layout]
    cfg = {"sq": SQ, "awq": AWQ, "awq_gptq": AWQ_GPTQ}[algo]
    outs = run_distributed(workers.algorithm_layout, world, str(tiny_dir / "hf"), tp, pp, cfg, CALIB, EVALS, timeout_s=300)
    seen = set()
    for out, state in outs:
        for name, value in state.items():
            if world == tp * pp:
                assert torch.equal(value, ref_state[name]), name
            else:
                torch.testing.assert_close(value, ref_state[name], rtol=1e-4, atol=1e-6, msg=name)
            seen.add(name)
        if out is not None and algo != "awq_gptq":
            _assert_logits_match(out, ref_logits, exact=False)
    assert seen == set(ref_state)
    assert any(n.endswith("pre_quant_scale") and not torch.equal(v, torch.ones_like(v)) for n, v in ref_state.items())


def test_smoothed_checkpoint_reshards(tiny_dir, tmp_path):
    """Pre-quant scales (split along the input dim of row-parallel layers) and folded norms
    survive a dist checkpoint written at TP=2 and loaded at TP=1."""
    path, ckpt = str(tiny_dir / "hf"), str(tmp_path / "ckpt")
    saved = run_distributed(workers.calibrate_layout, 2, path, 2, 1, SQ, CALIB, EVALS, ckpt)
    loaded, = run_distributed(workers.restored_logits, 1, ckpt, 1, EVALS)
    torch.testing.assert_close(loaded, saved[0][0], rtol=1e-5, atol=1e-5)


def test_empty_rank_does_not_hang(tiny_dir):
    one = CALIB[:1]  # DP=2 with one window: rank 1 sees no data
    ref, = run_distributed(workers.calibrate_layout, 1, str(tiny_dir / "hf"), 1, 1, INT8_KV, one, EVALS)
    outs = run_distributed(workers.calibrate_layout, 2, str(tiny_dir / "hf"), 1, 1, INT8_KV, one, EVALS, timeout_s=120)
    for out, amax in outs:
        torch.testing.assert_close(out, ref[0], rtol=1e-5, atol=1e-5)
        _assert_same_amax(amax, ref[1])


def test_failing_rank_fails_every_rank_fast():
    start = time.monotonic()
    messages = run_distributed(workers.failing_calibration, 2, 1, timeout_s=120)
    assert time.monotonic() - start < 60  # well inside the 60 s process-group timeout
    assert messages[1] == "ValueError: corrupt calibration shard"
    assert messages[0].startswith("CalibrationError: calibration failed on rank 1 (ValueError: corrupt calibration shard)")


@pytest.mark.parametrize("save_tp,save_pp,load_tp,load_pp", [(2, 1, 1, 1), (1, 1, 2, 1), (1, 2, 1, 1), (1, 1, 1, 2)],
                         ids=["tp2-to-tp1", "tp1-to-tp2", "pp2-to-pp1", "pp1-to-pp2"])
def test_reshard_dist_checkpoint(tiny_dir, tmp_path, save_tp, save_pp, load_tp, load_pp):
    cfg = {**INT4_BLOCK32_MSE, "weight": {"format": "int4", "granularity": "block", "block_size": 32},
           "input": {"format": "int8"}, "kv_cache": {"format": "int8"}}
    path, ckpt = str(tiny_dir / "hf"), str(tmp_path / "ckpt")
    saved = run_distributed(workers.calibrate_layout, save_tp * save_pp, path, save_tp, save_pp, cfg, CALIB, EVALS, ckpt)
    reference = next(out for out, _ in saved if out is not None)
    loaded = run_distributed(workers.restored_logits, load_tp * load_pp, ckpt, load_tp, EVALS, load_pp)
    for out in loaded:
        if out is not None:
            torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    assert sum(out is not None for out in loaded) == load_tp
