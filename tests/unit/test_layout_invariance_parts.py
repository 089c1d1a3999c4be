"""The parts of layout-invariant calibration, in one process: fixed-order sums, canonical
shards, and that canonical GEMMs compute the same model (CPU; the cross-layout equality is in
tests/distributed and tests/integration/test_layout_invariance.py)."""
import math

import pytest
import torch

from nemo_quant.numerics.fixed_order import fixed_order_sum
from nemo_quant.runtime.canonical_gemms import canonical_gemms, canonical_shards


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("n", [0, 1, 1000, 300_000, 4_000_000])
def test_fixed_order_sum_is_the_same_at_any_thread_count(threads, n):
    t = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 1e3
    torch.set_num_threads(1)
    one = fixed_order_sum(t)
    torch.set_num_threads(2)
    two = fixed_order_sum(t)
    assert one.dtype == torch.float64 and torch.equal(one, two)
    assert math.isclose(float(one), math.fsum(t.double().tolist()), rel_tol=1e-12, abs_tol=1e-9)


def test_fixed_order_sum_follows_index_order():
    # 1e16 + 1 - 1e16 is 0 left to right in float64 (the 1 is lost), 1 in another order.
    assert float(fixed_order_sum(torch.tensor([1e16, 1.0, -1e16], dtype=torch.float64))) == 0.0
    assert float(fixed_order_sum(torch.tensor([1e16, -1e16, 1.0], dtype=torch.float64))) == 1.0


def test_canonical_shards_is_the_largest_tp_megatron_admits():
    from types import SimpleNamespace as C

    assert canonical_shards(C(num_attention_heads=9, num_query_groups=3, ffn_hidden_size=1536)) == 3  # SmolLM2
    assert canonical_shards(C(num_attention_heads=32, num_query_groups=None, ffn_hidden_size=11008)) == 32  # MHA
    assert canonical_shards(C(num_attention_heads=64, num_query_groups=8, ffn_hidden_size=28672)) == 8  # GQA 70B
    assert canonical_shards(C(num_attention_heads=4, num_query_groups=2, ffn_hidden_size=96)) == 2  # tests' tiny


def test_canonical_gemms_compute_the_same_model(tiny_model):
    from tests.quant_helpers import logits, tokens

    batch = tokens(3, 2, 16)
    plain = logits(tiny_model, batch)
    with torch.no_grad(), canonical_gemms(tiny_model):
        canonical = logits(tiny_model, batch)
    torch.testing.assert_close(canonical, plain, rtol=1e-5, atol=1e-5)
    # restored on exit: no instance overrides left, the config's activation is torch's again
    assert not any("_forward_impl" in vars(m) or "forward" in vars(m) for m in tiny_model.modules())
    assert tiny_model.config.activation_func is torch.nn.functional.silu
    assert torch.equal(logits(tiny_model, batch), plain)


def test_canonical_gemms_refuse_training(tiny_model):
    from tests.quant_helpers import tokens

    with canonical_gemms(tiny_model), pytest.raises(RuntimeError, match="no_grad"):
        tiny_model(tokens(3, 1, 8), position_ids=torch.arange(8).unsqueeze(0), attention_mask=None)
