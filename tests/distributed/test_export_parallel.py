"""Exports from sharded models equal the TP=1 export byte for byte: one calibrated checkpoint
(saved at TP=1, Megatron dist checkpoint) loaded at TP=2, PP=2 and DP=2 in spawned gloo ranks."""
import pytest

from nemo_quant.runtime.spawn import ChildProcessError, run_distributed
from tests import workers
from tests.quant_helpers import tokens

pytestmark = pytest.mark.distributed
# INT4 blocks of 16 (row-parallel block scales gathered over TP), FP8 inputs, FP8 KV cache,
# AWQ pre-quant scales (split along the input dim of row-parallel layers).
W4A8_KV = {"name": "w4a8_kv", "algorithm": "awq_lite",
           "weight": {"format": "int4", "granularity": "block", "block_size": 16},
           "input": {"format": "fp8_e4m3"}, "kv_cache": {"format": "fp8_e4m3"}}
NVFP4 = {"name": "nvfp4", "weight": {"format": "nvfp4", "granularity": "block"},
         "input": {"format": "nvfp4", "granularity": "block"}}


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("preset", [W4A8_KV, NVFP4], ids=["w4a8_kv", "nvfp4"])
def test_sharded_exports_equal_tp1_byte_for_byte(tiny_dir, tmp_path, preset):
    ckpt = tmp_path / "ckpt"
    run_distributed(workers.quantized_logits, 1, str(tiny_dir / "hf"), 1, preset, tokens(0), tokens(1), str(ckpt))
    run_distributed(workers.export_checkpoint_at, 1, str(ckpt), 1, 1, str(tmp_path / "tp1"))
    reference = _files(tmp_path / "tp1")
    assert "trtllm/rank1.safetensors" in reference and "hf/model.safetensors" in reference
    for tp, pp, world in ((2, 1, 2), (1, 2, 2), (1, 1, 2)):  # TP=2, PP=2, DP=2
        out = tmp_path / f"tp{tp}pp{pp}w{world}"
        run_distributed(workers.export_checkpoint_at, world, str(ckpt), tp, pp, str(out))
        got = _files(out)
        assert got.keys() == reference.keys()
        for name in reference:
            assert got[name] == reference[name], f"{name} differs at TP={tp} PP={pp} world={world}"


# AWQ with folded smoothing scales (V rows of a KV group shared by 2 query heads, up rows of the
# per-rank [gate; up] fc1), INT4 blocks of 16, FP8 KV cache: the compressed-tensors export.
AWQ_FOLDED = {"name": "awq_folded", "algorithm": "awq_full", "search": {"fold_all_scales": True},
              "weight": {"format": "int4", "granularity": "block", "block_size": 16}, "kv_cache": {"format": "fp8_e4m3"}}


def test_compressed_tensors_exports_are_layout_invariant(tiny_dir, tmp_path):
    """Calibrated (and folded) at TP=2 or TP=1, exported at TP=1, TP=2, PP=2 or DP=2: the same bytes."""
    ckpts = {}
    for tp in (1, 2):
        ckpts[tp] = tmp_path / f"ckpt_tp{tp}"
        run_distributed(workers.quantized_logits, tp, str(tiny_dir / "hf"), tp, AWQ_FOLDED, tokens(0), tokens(1),
                        str(ckpts[tp]))
    run_distributed(workers.export_checkpoint_at, 1, str(ckpts[1]), 1, 1, str(tmp_path / "ref"), "compressed_tensors", 1)
    reference = _files(tmp_path / "ref")
    assert "model.safetensors" in reference and b"compressed-tensors" in reference["config.json"]
    for ckpt, tp, pp, world in ((ckpts[2], 1, 1, 1), (ckpts[1], 2, 1, 2), (ckpts[1], 1, 2, 2), (ckpts[1], 1, 1, 2)):
        out = tmp_path / f"{ckpt.name}_tp{tp}pp{pp}w{world}"
        run_distributed(workers.export_checkpoint_at, world, str(ckpt), tp, pp, str(out), "compressed_tensors", 1)
        got = _files(out)
        assert got.keys() == reference.keys()
        for name in reference:
            assert got[name] == reference[name], f"{name} differs ({ckpt.name} exported at TP={tp} PP={pp} world={world})"


def test_inference_pp2_renumbers_layers_per_stage(tiny_dir, tmp_path):
    from nemo_quant.export.validate import read_header, validate_checkpoint

    ckpt = tmp_path / "ckpt"
    run_distributed(workers.quantized_logits, 1, str(tiny_dir / "hf"), 1, W4A8_KV, tokens(0), tokens(1), str(ckpt))
    run_distributed(workers.export_checkpoint_at, 2, str(ckpt), 2, 1, str(tmp_path / "out"), "trtllm", 2, 2)
    report = validate_checkpoint(tmp_path / "out")
    assert report.ok, report.errors
    ranks = [read_header(tmp_path / "out" / f"rank{r}.safetensors") for r in range(4)]
    for r, header in enumerate(ranks):
        first, last = r // 2 == 0, r // 2 == 1
        assert ("transformer.vocab_embedding.weight" in header) == first
        assert ("lm_head.weight" in header) == ("transformer.ln_f.weight" in header) == last
        assert {k.split(".")[2] for k in header if k.startswith("transformer.layers.")} == {"0", "1"}


def test_writer_failure_fails_every_rank_promptly_and_leaves_nothing(tiny_dir, tmp_path):
    """Rank 0 (stage 0) fails while stage 1 still has layers to send: every rank must raise
    (no rank waiting out the process-group timeout) and no export.path may appear."""
    ckpt = tmp_path / "ckpt"
    run_distributed(workers.quantized_logits, 1, str(tiny_dir / "hf"), 1, NVFP4, tokens(0), tokens(1), str(ckpt))
    out = tmp_path / "out"
    with pytest.raises(ChildProcessError) as failed:
        run_distributed(workers.export_failing_on_rank0, 2, str(ckpt), 1, 2, str(out), 1, timeout_s=90)
    assert "timed out" not in str(failed.value)
    assert "injected" in str(failed.value) or "failed on the writing rank" in str(failed.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no target, no staging directory
