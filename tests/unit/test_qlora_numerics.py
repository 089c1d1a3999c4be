"""NF4 as bitsandbytes 0.50.2 stores it (the oracle, a test extra): codes, 8-bit absmax codes,
nested absmax and offset byte for byte, on real SmolLM2 tensors and on edge cases of the
second level's lookup-table search."""
import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from nemo_quant.numerics.bnb_search import lookup_nearest  # noqa: E402
from nemo_quant.numerics.nf4 import (  # noqa: E402
    dynamic_map, nf4_dequantize, nf4_quantize, pack_nf4,
)


def _assert_bnb_bytes(w: torch.Tensor) -> None:
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    ours = nf4_quantize(w)
    assert torch.equal(pack_nf4(ours.codes.reshape(w.shape[0], -1)).reshape(-1), packed.reshape(-1))
    assert torch.equal(ours.scale_codes.reshape(-1), state.absmax)
    assert torch.equal(ours.scale_scales, state.state2.absmax)
    assert torch.equal(ours.scale_mean, state.offset)
    assert torch.equal(nf4_dequantize(ours, w.dtype), bnb_functional.dequantize_4bit(packed, state))


def test_dynamic_map_is_bitsandbytes():
    assert torch.equal(dynamic_map(), bnb_functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("name", ["model.layers.0.self_attn.q_proj.weight", "model.layers.7.self_attn.k_proj.weight",
                                  "model.layers.12.mlp.up_proj.weight", "model.layers.29.mlp.down_proj.weight"])
def test_smollm2_tensors_match_bitsandbytes_byte_for_byte(smollm2_source, name):
    w = smollm2_source.get(name).float()
    _assert_bnb_bytes(w)
    _assert_bnb_bytes(w.bfloat16())


def test_zero_rows_and_outliers_match_bitsandbytes():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g) * 0.02
    w[5] = 0  # all-zero blocks: absmax 0
    w[9, 17] = 3.0  # an outlier block far above the mean absmax
    _assert_bnb_bytes(w)


def test_second_level_search_follows_bitsandbytes_table_not_nearest():
    """Values on and one ulp around the dynamic map's midpoints: bnb's table picks differ from
    the exact nearest entry on some of them; ours must equal bnb's everywhere."""
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) * 0.5
    points = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))])
    x = torch.cat([points, torch.tensor([1.0, -1.0])])  # 1.0 / -1.0 fix each block's absmax at 1
    blocks = torch.nn.functional.pad(x, (0, -x.numel() % 256)).reshape(-1, 256)
    blocks[:, 0], blocks[:, 1] = 1.0, -1.0
    want, _ = bnb_functional.quantize_blockwise(blocks.reshape(-1), code=code, blocksize=256)
    got = lookup_nearest(blocks.reshape(-1), code)
    assert torch.equal(got, want)
    nearest = torch.bucketize(blocks.reshape(-1), mids).to(torch.uint8)
    assert not torch.equal(nearest, want), "the edge cases no longer tell the table from exact nearest"
