"""Quantized models across TP layouts, dist-checkpoint round trips, and QAT with resume."""
import pytest
import torch

from nemo_quant.runtime.spawn import run_distributed
from tests import workers
from tests.quant_helpers import INT4_BLOCK32_MSE, INT8_CHANNEL, W4A8_KV, tokens

pytestmark = pytest.mark.distributed
CALIB, EVALS = tokens(10, 4, 16), tokens(11, 2, 16)


# TP changes fp32 summation order; with FP8 activations after INT4 weights, a value sitting on
# a rounding boundary can land on the neighbouring FP8 code, so W4A8 is compared in norm.
@pytest.mark.parametrize("cfg,norm_tol", [(INT8_CHANNEL, None), (INT4_BLOCK32_MSE, None), (W4A8_KV, 1e-2)],
                         ids=["int8_channel", "int4_block32_mse", "w4a8_kv"])
def test_tp2_quantized_model_matches_tp1(tiny_dir, cfg, norm_tol):
    path = str(tiny_dir / "tiny.gguf")
    (ref, ref_amax), = run_distributed(workers.quantized_logits, 1, path, 1, cfg, CALIB, EVALS)
    outs = run_distributed(workers.quantized_logits, 2, path, 2, cfg, CALIB, EVALS)
    for out, amax in outs:
        if amax is None:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
            continue
        # row-parallel input amax is max-reduced over TP: both ranks hold the TP=1 value
        # (up to fp32 summation order in the attention that produced it)
        torch.testing.assert_close(amax, ref_amax, rtol=1e-6, atol=0)
        if norm_tol is None:
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        else:
            assert (out - ref).norm() / ref.norm() < norm_tol


@pytest.mark.parametrize("tp", [1, 2])
def test_dist_checkpoint_restore_identical_logits(tiny_dir, tmp_path, tp):
    path, ckpt = str(tiny_dir / "hf"), str(tmp_path / "ptq")
    outs = run_distributed(workers.quantized_logits, tp, path, tp, W4A8_KV, CALIB, EVALS, ckpt)
    restored = run_distributed(workers.restored_logits, tp, ckpt, tp, EVALS)
    for (before, _), after in zip(outs, restored):
        assert torch.equal(before, after)
    assert not (tmp_path / ".ptq.partial").exists()


def test_qat_loss_decreases_scales_frozen_and_resumes(tiny_dir, tmp_path):
    text = torch.arange(64).repeat(6)[: 4 * 17].reshape(4, 17) % 257  # a learnable, repeating sequence
    path, save = str(tiny_dir / "hf"), str(tmp_path / "qat")
    losses, before, after, step = run_distributed(workers.qat_run, 1, path, save, 10, W4A8_KV, text)[0]
    assert step == 10 and len(losses) == 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for name in before:
        assert torch.equal(before[name], after[name]), name
    # a second run resumes from step 10 (the crash-and-restart path) and trains to 15
    losses2, before2, _, step2 = run_distributed(workers.qat_run, 1, path, save, 15, None, text)[0]
    assert step2 == 15 and losses2[:10] == losses and len(losses2) == 15
    for name in before:
        assert torch.equal(before2[name], before[name]), name


def test_qat_pipeline_parallel_matches_single_stage(tiny_dir, tmp_path):
    """PP=2 runs the same math on two processes: identical loss trajectory, tied embeddings kept in sync."""
    text = torch.arange(64).repeat(6)[: 4 * 17].reshape(4, 17) % 257
    path = str(tiny_dir / "hf")
    ref = run_distributed(workers.qat_run, 1, path, str(tmp_path / "pp1"), 6, W4A8_KV, text)[0][0]
    outs = run_distributed(workers.qat_run, 2, path, str(tmp_path / "pp2"), 6, W4A8_KV, text, 1e-3, 2)
    for losses, *_ in outs:
        assert losses == pytest.approx(ref, rel=1e-5, abs=1e-6)
