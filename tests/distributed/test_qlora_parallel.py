"""QLoRA at TP=2, PP=2 and DP=2 against TP=1: the same NF4 bytes and adapters (exports
byte-identical), the same training, checkpoints that reshard, and an exact resume after a crash."""
import pytest
import torch

from nemo_quant.runtime.spawn import ChildProcessError, run_distributed
from tests import qlora_workers, workers

pytestmark = pytest.mark.distributed
# LoftQ adapters depend on every weight of the layer (TP-gathered SVD), and dropout on the
# counter-based masks: both must come out the same at every layout.
CFG = {"init": "loftq", "rank": 4, "alpha": 8}
TEXT = (torch.arange(64).repeat(8)[: 6 * 17].reshape(6, 17) * 7) % 257


@pytest.fixture(scope="module")
def qtiny_dir(tmp_path_factory):
    from tests.tiny_models import QTINY, write_hf_checkpoint

    return write_hf_checkpoint(tmp_path_factory.mktemp("qtiny") / "hf", QTINY)


@pytest.fixture(scope="module")
def tp1(qtiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("tp1")
    return run_distributed(qlora_workers.qlora_run, 1, str(qtiny_dir), 1, 1, CFG, TEXT, 4, str(root / "ck"),
                           str(root / "export"))[0]


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (1, 1)], ids=["tp2", "pp2", "dp2"])
def test_layouts_store_the_same_bytes_and_train_alike(qtiny_dir, tmp_path, tp1, tp, pp):
    ref_losses, ref_logits, ref_digests = tp1
    outs = run_distributed(qlora_workers.qlora_run, 2, str(qtiny_dir), tp, pp, CFG, TEXT, 4, str(tmp_path / "ck"),
                           str(tmp_path / "export"))
    losses, out_logits, digests = outs[0]
    assert digests == ref_digests  # NF4 base + LoftQ adapters, exported from this layout
    if tp * pp == 2:  # DP=2 sees two windows per step: a different run, only its exports compare
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=2e-5, atol=0)
        last = [o[1] for o in outs if o[1] is not None][-1]
        torch.testing.assert_close(last, ref_logits, rtol=1e-4, atol=1e-4)
    if tp == 2:  # the TP=2 checkpoint reloads exactly at TP=2, and at TP=1 up to fp32 summation order
        ckpt = str(tmp_path / "ck" / "step_4")
        same = run_distributed(qlora_workers.qlora_restored_logits, 2, ckpt, 2, 1, TEXT[:2, :-1])
        assert torch.equal(same[0], out_logits)
        resharded = run_distributed(qlora_workers.qlora_restored_logits, 1, ckpt, 1, 1, TEXT[:2, :-1])[0]
        torch.testing.assert_close(resharded, out_logits, rtol=1e-4, atol=1e-4)


def test_resume_after_a_crash_repeats_the_losses(qtiny_dir, tmp_path):
    cfg = {**CFG, "dropout": 0.1}  # the dropout masks must resume too
    args = (str(qtiny_dir), 1, 1, cfg, TEXT, 6)
    straight = run_distributed(qlora_workers.qlora_run, 1, *args, str(tmp_path / "a"))[0][0]
    with pytest.raises(ChildProcessError, match="injected crash after 5 steps"):
        run_distributed(qlora_workers.qlora_run, 1, *args, str(tmp_path / "b"), None, 5)
    assert (tmp_path / "b" / "latest").read_text() == "step_4"
    resumed = run_distributed(qlora_workers.qlora_run, 1, *args, str(tmp_path / "b"))[0][0]
    assert resumed == straight
    assert len(set(straight)) == len(straight)  # it trained


def test_tp_slices_that_split_nf4_blocks_are_refused_on_every_rank(tmp_path):
    """hidden 192: o_proj's 192 inputs are whole blocks at TP=1, but 96 per rank at TP=2."""
    from nemo_quant.models.arch import LlamaArch
    from tests.tiny_models import write_hf_checkpoint

    arch = LlamaArch(num_layers=2, hidden_size=192, num_attention_heads=6, num_query_groups=2, ffn_hidden_size=384,
                     vocab_size=257, max_position_embeddings=128, rotary_base=10000.0, norm_eps=1e-5,
                     tie_word_embeddings=True)
    path = str(write_hf_checkpoint(tmp_path / "hf", arch))
    assert run_distributed(workers.mode_preflight_message, 1, path, 1, "qlora", {}) == [None]
    messages = run_distributed(workers.mode_preflight_message, 2, path, 2, "qlora", {})
    assert messages[0] == messages[1]
    assert "linear_proj: at this TP each rank holds 96 of its 192 input columns" in messages[0]
    assert "parallel.tp" in messages[0]
    # a plain LoRA has no blocks: the same layout is fine
    assert run_distributed(workers.mode_preflight_message, 2, path, 2, "qlora", {"base_format": "none"}) == [None, None]
