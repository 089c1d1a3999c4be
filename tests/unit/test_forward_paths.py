"""The CPU-fast forward (SDPA core attention, batch-major logits) computes what Megatron's own
local path computes: logits, losses and gradients, with and without grouped queries."""
import io

import torch

from nemo_quant.models.builder import build_gpt_model
from nemo_quant.runtime.pipeline import position_ids_for
from tests.tiny_models import TINY


def _pair():
    torch.manual_seed(0)
    fast = build_gpt_model(TINY)
    torch.manual_seed(0)
    plain = build_gpt_model(TINY, core_attention="megatron")
    for module in (plain, plain.output_layer):  # Megatron's own sequence-major logits
        module._forward_pre_hooks.clear()
        module._forward_hooks.clear()
    plain.load_state_dict(fast.state_dict())
    return fast, plain


def test_logits_losses_and_gradients_match_megatrons_local_path(megatron_tp1):
    from nemo_quant.models.sdpa_attention import SDPADotProductAttention

    fast, plain = _pair()
    assert isinstance(fast.decoder.layers[0].self_attention.core_attention, SDPADotProductAttention)
    tokens = torch.randint(0, TINY.vocab_size, (3, 24), generator=torch.Generator().manual_seed(1))
    pos = position_ids_for(tokens)
    a, b = fast(tokens, pos, None), plain(tokens, pos, None)
    assert a.shape == b.shape == (3, 24, fast.embedding.word_embeddings.weight.shape[0]) and a.is_contiguous()
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    labels = torch.roll(tokens, -1, dims=1)
    la, lb = fast(tokens, pos, None, labels=labels), plain(tokens, pos, None, labels=labels)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    la.sum().backward()
    lb.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_plain_progress_lines_off_a_terminal():
    from nemo_quant.utils.progress import PlainProgress

    out = io.StringIO()
    bar = PlainProgress(95, "calibrate", "batch", stream=out)
    for _ in range(95):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and 9 <= len(lines) <= 11
    assert lines[-1].startswith("calibrate: 95/95 batch")


def test_calibration_skips_the_unused_vocab_gemm_and_gets_the_same_scales(megatron_tp1):
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.quantization.modules import quantizers
    from nemo_quant.runtime.pipeline import logits_skipped
    from tests.quant_helpers import FP8_KV, loop_over, tokens

    fast, plain = _pair()
    windows = torch.cat([tokens(1), tokens(2)])
    calls = []
    fast.output_layer.register_forward_hook(lambda m, a, out: calls.append(out[0].shape[-1]))
    with logits_skipped(fast) as skipped:
        assert skipped and fast(windows, position_ids_for(windows), None).shape[-1] == 0
    assert fast(windows, position_ids_for(windows), None).shape[-1] > 0  # restored
    for model in (fast, plain):
        apply_modes(model, [("quantize", FP8_KV)])
    calls.clear()
    calibrate(fast, windows_forward_loop(windows, batch_size=2))
    calibrate(plain, loop_over(windows))  # a user loop: full logits
    assert calls == [0, 0]  # two batches, no vocab GEMM
    for (name, a), (_, b) in zip(quantizers(fast), quantizers(plain)):
        torch.testing.assert_close(a.amax, b.amax, rtol=1e-6, atol=0, msg=name)
    with logits_skipped(fast) as skipped:
        pass
    assert skipped  # the output layer is excluded from quantization, so it stays skippable
