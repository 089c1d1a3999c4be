"""Speculative heads on one process: the acceptance replay's counting (oracle / zero drafts), the
training-time-test mask, KV-cached greedy == full re-forwards, the cached measurement == a live
speculative loop for every method, exports read back by an independent (engine-named) runner, the
losses against hand computations, heads-only checkpoints, and bad input refused before work."""
import json

import pytest
import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.eval.acceptance import live_speculative_decode, measure_acceptance, replay
from nemo_quant.modes import ModeError, apply_modes
from nemo_quant.speculative.continuations import greedy_continue
from nemo_quant.speculative.unroll import unroll_mask
from tests.speculative_helpers import (
    METHOD_MODE, ReferenceEagle3, ReferenceMedusa, lively_model, lively_tensors, preset, reference_tau, spec_config,
    train_heads,
)
from tests.tiny_models import TINY

PROMPT, TOTAL = 16, 40


@pytest.fixture(scope="module")
def lively(megatron_tp1):
    """The lively tiny base (Megatron) and its greedy continuations of 6 random prompts."""
    model = lively_model()
    prompts = torch.randint(0, 257, (6, PROMPT), generator=torch.Generator().manual_seed(3))
    return greedy_continue(model, prompts, TOTAL - PROMPT, TINY.vocab_size)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_oracle_and_zero_drafts(k):
    seq = 30
    oracle, zero = torch.ones(k, seq, dtype=torch.bool), torch.zeros(k, seq, dtype=torch.bool)
    tokens, steps, accepted = replay(oracle, 4, k)
    assert tokens / steps == k + 1 and accepted == [steps] * k
    tokens, steps, accepted = replay(zero, 4, k)
    assert tokens / steps == 1.0 and accepted == [0] * k
    mixed = oracle.clone()
    mixed[1:, :] = False  # only the first draft ever right: 2 tokens per step
    assert replay(mixed, 4, k)[0] / replay(mixed, 4, k)[1] == (2.0 if k > 1 else 2.0)


def test_unroll_mask_known_answer():
    keep = ~unroll_mask(4, 2)
    # block 1, row 2 (chain starting after token 2): block-0 keys 0..1, and itself (block 1, row 2)
    assert keep[4 + 2].nonzero().flatten().tolist() == [0, 1, 6]
    assert keep[2].nonzero().flatten().tolist() == [0, 1, 2]  # block 0: causal
    assert keep[4 + 0].nonzero().flatten().tolist() == [4]  # no verified context: only itself


def test_kv_cached_greedy_equals_full_reforwards(lively):
    from nemo_quant.runtime.pipeline import position_ids_for

    model = lively_model()
    seq = lively[:, :PROMPT]
    with torch.no_grad():
        for _ in range(TOTAL - PROMPT):
            logits = model(seq, position_ids_for(seq), None)[:, -1, :TINY.vocab_size]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, lively)
    assert len(set(lively[:, PROMPT:].flatten().tolist())) > 40  # not a repeating loop


@pytest.mark.parametrize("method", ["medusa", "eagle3", "eagle1", "mtp"])
def test_cached_acceptance_equals_a_live_speculative_loop(lively, method):
    model = lively_model()
    losses = train_heads(model, spec_config(method, ttt_steps=3), lively, steps=12)
    assert losses[-1] < losses[0]
    few = lively[:3]  # the live loop re-forwards every step: a few prompts keep it quick
    for k in (1, 3) if method == "eagle3" else (3,):  # k = 1 is the slowest loop: once is enough
        cached = measure_acceptance(model, few, PROMPT, (k,))
        live = [live_speculative_decode(model, few[i:i + 1, :PROMPT], TOTAL, k, TINY.vocab_size)
                for i in range(few.shape[0])]
        for i, (seq, _, _) in enumerate(live):
            assert torch.equal(seq, few[i, :len(seq)])  # the loop reproduces the base's greedy text
        live_tau = sum(t for _, t, _ in live) / sum(s for _, _, s in live)
        assert cached.tau[k] == pytest.approx(live_tau, abs=1e-12)
        assert 1.0 < cached.tau[k] <= k + 1  # trained heads accept something


def test_exported_drafts_give_the_same_tau_through_an_independent_runner(lively, tmp_path):
    """EAGLE-3 (reduced vocabulary, d2t) and Medusa exported in engine names, run incrementally by
    reference code written from vLLM's loaders on the transformers base: the same drafts, the same tau."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_quant.export.hf import hf_model_config
    from nemo_quant.export.writer import export_checkpoint

    hf = LlamaForCausalLM(LlamaConfig(**hf_model_config(TINY, torch.float32))).eval()
    hf.load_state_dict({"lm_head.weight": lively_tensors()["model.embed_tokens.weight"], **lively_tensors()})
    for method, extra, runner in (("eagle3", {"draft_vocab_size": 200}, ReferenceEagle3), ("medusa", {}, ReferenceMedusa)):
        model = lively_model()
        train_heads(model, spec_config(method, **extra), lively, steps=12)
        out = tmp_path / method
        export_checkpoint(model, TINY, {"format": "draft", "path": str(out), "dtype": "float32"})
        config = json.loads((out / "config.json").read_text())
        if method == "eagle3":
            assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 200
            assert config["tie_word_embeddings"] is False and "eagle_aux_hidden_state_layer_ids" in config["eagle_config"]
        else:
            assert config["architectures"] == ["MedusaModel"] and config["medusa_fc_bias"] is True
        ours = measure_acceptance(model, lively, PROMPT, (3,)).tau[3]
        ref, sequences = reference_tau(hf, runner(out, hf), lively[:, :PROMPT], TOTAL, 3)
        for i, seq in enumerate(sequences):
            assert torch.equal(seq, lively[i, :len(seq)])
        assert ref == pytest.approx(ours, abs=1e-12), method
        assert ours > 1.0


def test_losses_equal_hand_computations(lively):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_quant.speculative.base_view import base_view
    from nemo_quant.speculative.losses import draft_loss
    from nemo_quant.speculative.mode import ATTR

    model = lively_model()
    apply_modes(model, [("eagle", spec_config("eagle3", draft_vocab_size=100))])
    draft = getattr(model, ATTR)
    with torch.no_grad():
        draft.draft_ids.copy_(torch.arange(0, 200, 2))
    view = base_view(model, lively[:2], draft.aux_layers)
    loss, _ = draft_loss(draft, view, 2, 0.5, 1.0, TINY.vocab_size)
    logits = draft.draft_logits(view, 2)
    target = view.logits.transpose(0, 1)[1:, :, 0:200:2]  # the base at p+1, over the draft tokens
    want = 0
    for s, out in enumerate(logits):
        kl = torch.nn.functional.kl_div(out[:-1, :, :100].log_softmax(-1), target.log_softmax(-1), log_target=True,
                                        reduction="none").sum(-1)
        want = want + 0.5 ** s * kl[s:].mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)

    model = lively_model()
    apply_modes(model, [("medusa", spec_config("medusa", num_heads=2))])
    draft = getattr(model, ATTR)
    view = base_view(model, lively[:2], [])
    loss, _ = draft_loss(draft, view, 2, 0.8, 1.0, TINY.vocab_size)
    greedy = view.logits[..., :257].argmax(-1).t()  # [s, b]: the base's token at p+1 is the target of row p
    want = 0
    for s, out in enumerate(draft.draft_logits(view, 2)):
        ce = vocab_parallel_cross_entropy(out[:-1].float().contiguous(), greedy[1:].contiguous())
        want = want + 0.8 ** s * ce[s:].mean()
    assert float(loss) == pytest.approx(float(want), rel=1e-5)


def test_heads_only_checkpoint_reloads_on_its_base_and_refuses_another(lively, tmp_path):
    from nemo_quant.checkpoint.model_checkpoint import holds_base, load_into, save_model
    from nemo_quant.models.builder import build_gpt_model
    from nemo_quant.speculative.base_view import base_view
    from nemo_quant.speculative.mode import ATTR

    model = lively_model()
    train_heads(model, spec_config("eagle3"), lively, steps=3)
    save_model(model, TINY, tmp_path / "ck")
    assert not holds_base(tmp_path / "ck")
    size = sum(f.stat().st_size for f in (tmp_path / "ck" / "model").rglob("*") if f.is_file())
    base_bytes = sum(p.numel() * 4 for name, p in model.named_parameters() if not name.startswith("speculative."))
    assert size < base_bytes  # the heads (and nothing of the base)
    fresh = load_into(lively_model(), tmp_path / "ck")
    with torch.no_grad():
        want = getattr(model, ATTR).draft_logits(base_view(model, lively[:2], [0, 1, 2]), 2)
        got = getattr(fresh, ATTR).draft_logits(base_view(fresh, lively[:2], [0, 1, 2]), 2)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.manual_seed(5)
    with pytest.raises(ValueError, match="trained on another base"):
        load_into(build_gpt_model(TINY), tmp_path / "ck")


@pytest.mark.parametrize("cfg,message", [
    (spec_config("eagle3", aux_layers=[0, 9]), "speculative.aux_layers"),
    (spec_config("eagle3", draft_vocab_size=400), "speculative.draft_vocab_size=400"),
    (spec_config("medusa", draft_vocab_size=100), "EAGLE-3's reduced vocabulary"),
    (spec_config("medusa", num_heads=0), "speculative.num_heads=0"),
    (spec_config("mtp", ttt_steps=0), "speculative.ttt_steps=0"),
])
def test_bad_heads_refused_before_any_change(megatron_tp1, cfg, message):
    model = lively_model()
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ConfigError, match=message):
        apply_modes(model, [(METHOD_MODE[cfg["method"]], cfg)])
    assert not hasattr(model, "speculative") and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_heads_follow_quantization_but_not_qlora_and_nothing_follows_them(megatron_tp1):
    model = lively_model()
    apply_modes(model, [("quantize", preset("quant", "fp8")), ("medusa", spec_config("medusa"))])
    heads_first = lively_model()
    apply_modes(heads_first, [("mtp", spec_config("mtp"))])
    with pytest.raises(ModeError, match="cannot be applied after 'mtp'"):
        apply_modes(heads_first, [("quantize", preset("quant", "fp8"))])
    qlora = lively_model()
    apply_modes(qlora, [("qlora", {**preset("qlora", "lora"), "rank": 4})])
    with pytest.raises(ModeError, match="cannot be applied after 'qlora'"):
        apply_modes(qlora, [("eagle", spec_config("eagle3"))])


@pytest.mark.parametrize("method", ["mtp", "medusa", "eagle3"])
def test_draft_exports_validate_and_a_damaged_one_does_not(megatron_tp1, tmp_path, method):
    from safetensors.torch import load_file, save_file

    from nemo_quant.export.validate import validate_checkpoint
    from nemo_quant.export.writer import export_checkpoint

    model = lively_model()
    apply_modes(model, [(METHOD_MODE[method], spec_config(method))])
    export_checkpoint(model, TINY, {"format": "draft", "path": str(tmp_path / "d")})
    report = validate_checkpoint(tmp_path / "d")
    assert report.ok, report.errors
    tensors = load_file(str(tmp_path / "d" / "model.safetensors"))
    tensors.pop(sorted(tensors)[0])
    save_file(tensors, str(tmp_path / "d" / "model.safetensors"))
    assert any("missing tensor" in e for e in validate_checkpoint(tmp_path / "d").errors)


def test_draft_export_of_a_model_without_heads_is_refused(megatron_tp1, tmp_path):
    from nemo_quant.export.formats import ExportError
    from nemo_quant.export.writer import export_checkpoint

    with pytest.raises(ExportError, match="has none"):
        export_checkpoint(lively_model(), TINY, {"format": "draft", "path": str(tmp_path / "d")})
    assert not (tmp_path / "d").exists()
