"""Importers on tiny checkpoints the test writes: GGUF vs HF vs the independent reference."""
import dataclasses

import pytest
import torch

from nemo_quant.models.megatron_layout import interleave_qkv, split_qkv
from nemo_quant.models.reference_llama import ReferenceLlama
from nemo_quant.models.sources import GGUFSource, HFSafetensorsSource, open_source, unpermute_rotary
from nemo_quant.runtime.spawn import run_distributed
from tests import workers
from tests.tiny_models import TINY, permute_rotary, tiny_hf_tensors

TOKENS = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 256], [1, 2, 3, 4, 5, 6, 7, 8]])


def test_unpermute_inverts_llama_cpp_permutation():
    w = torch.randn(4 * 16, 8)
    assert torch.equal(unpermute_rotary(permute_rotary(w, 4), 4), w)
    assert not torch.equal(permute_rotary(w, 4), w)


def test_qkv_interleave_round_trip_and_group_order():
    q, k, v = torch.randn(64, 8), torch.randn(32, 8), torch.randn(32, 8)
    shards = [interleave_qkv(q, k, v, TINY, r, 2) for r in range(2)]
    # Rank 0 owns KV group 0: its two query heads, then its key head, then its value head.
    assert torch.equal(shards[0][:32], q[:32]) and torch.equal(shards[0][32:48], k[:16]) and torch.equal(shards[0][48:], v[:16])
    q2, k2, v2 = split_qkv(torch.cat(shards), TINY)
    assert torch.equal(q2, q) and torch.equal(k2, k) and torch.equal(v2, v)


def test_sources_agree(tiny_dir):
    hf, gg = HFSafetensorsSource(tiny_dir / "hf"), GGUFSource(tiny_dir / "tiny.gguf")
    assert hf.arch == TINY
    # GGUF stores the epsilon as float32.
    assert gg.arch.norm_eps == pytest.approx(TINY.norm_eps, rel=1e-6)
    assert dataclasses.replace(gg.arch, norm_eps=TINY.norm_eps) == TINY
    expected = tiny_hf_tensors()
    assert sorted(hf.names()) == sorted(expected) == sorted(gg.names())
    for name, tensor in expected.items():
        assert torch.equal(hf.get(name), tensor), name
        assert torch.equal(gg.get(name), tensor), name


def test_open_source_rejects_unknown_paths(tmp_path):
    with pytest.raises(ValueError, match="model.path"):
        open_source(tmp_path / "weights.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        HFSafetensorsSource(tmp_path)


@pytest.mark.distributed
def test_megatron_import_matches_reference(tiny_dir):
    reference = ReferenceLlama(GGUFSource(tiny_dir / "tiny.gguf")).logits(TOKENS)
    from_gguf, = run_distributed(workers.sharded_logits, 1, str(tiny_dir / "tiny.gguf"), 1, 1, TOKENS)
    from_hf, = run_distributed(workers.sharded_logits, 1, str(tiny_dir / "hf"), 1, 1, TOKENS)
    torch.testing.assert_close(from_gguf, reference, rtol=1e-5, atol=1e-5)
    assert torch.equal(from_gguf, from_hf)
