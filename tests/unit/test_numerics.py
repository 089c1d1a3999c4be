"""Every format against its pure-torch reference: grid membership, round-trip bounds, edge values."""
import pytest
import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks
from nemo_quant.numerics.fp8 import fake_quant_fp8
from nemo_quant.numerics.integer import fake_quant_int, fake_quant_int_blocks, int_quantize
from nemo_quant.numerics.minifloat import E2M1, E4M3, E5M2, round_to_minifloat
from nemo_quant.numerics.mx import fake_quant_mx
from nemo_quant.numerics.nf4 import NF4_CODEBOOK, fake_quant_nf4, nf4_dequantize, nf4_quantize
from nemo_quant.numerics.nvfp4 import fake_quant_nvfp4, nvfp4_quantize

SEEDS = [0, 1, 2]


def _x(seed, *shape, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * scale
    x[..., :3] = torch.tensor([0.0, -0.0, 1e-30])  # zeros and a denormal-sized input
    return x


def _on_grid(values, grid):
    mags = values.abs().reshape(-1, 1)
    return bool((mags == grid.reshape(1, -1)).any(dim=1).all())


@pytest.mark.parametrize("fmt", [E4M3, E5M2, E2M1])
def test_minifloat_grid_and_nearest(fmt):
    grid = fmt.grid()
    assert grid.max().item() == fmt.max_value
    x = torch.linspace(-fmt.max_value * 1.5, fmt.max_value * 1.5, 20001)
    q = round_to_minifloat(x, fmt)
    assert _on_grid(q, grid)
    # nearest: no grid point is strictly closer than the chosen one
    dist = (x.abs().clamp(max=fmt.max_value).unsqueeze(1) - grid.unsqueeze(0)).abs()
    assert torch.all((q.abs() - x.abs().clamp(max=fmt.max_value)).abs() <= dist.min(dim=1).values + 1e-12)


def test_e2m1_grid_is_nvfp4_values():
    assert E2M1.grid().tolist() == [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.mark.parametrize("name,dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
@pytest.mark.parametrize("seed", SEEDS)
def test_fp8_cast_matches_reference_bit_for_bit(name, dtype, seed):
    x = _x(seed, 64, 96, scale=10.0)
    amax = x.abs().amax(dim=1, keepdim=True)  # per-channel
    fast, ref = fake_quant_fp8(x, amax, name), fake_quant_fp8(x, amax, name, reference=True)
    assert torch.equal(fast, ref)
    assert torch.isfinite(fast).all()


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("seed", SEEDS)
def test_int_per_channel_bounds_and_grid(bits, seed):
    x = _x(seed, 32, 80)
    amax = x.abs().amax(dim=1, keepdim=True)
    codes, scale = int_quantize(x, amax, bits)
    assert torch.equal(codes, codes.round()) and codes.abs().max() <= 2 ** (bits - 1)
    y = fake_quant_int(x, amax, bits)
    assert torch.all((y - x).abs() <= scale / 2 + 1e-6)
    assert torch.equal(fake_quant_int(y, amax, bits), y)  # idempotent


def test_int_blocks_ragged_last_block_uses_its_own_scale():
    x = torch.cat([torch.full((1, 128), 100.0), torch.full((1, 64), 0.01)], dim=1)  # 576-like ragged tail
    amax = to_blocks(x, 128).abs().amax(-1)
    assert amax.shape == (1, 2) and amax[0, 1] == pytest.approx(0.01)
    y = fake_quant_int_blocks(x, amax, 4, 128)
    torch.testing.assert_close(y, x)  # constant blocks are exactly representable
    assert torch.equal(from_blocks(to_blocks(x, 128), 192), x)


def test_int_zero_tensor_no_nan():
    y = fake_quant_int(torch.zeros(4, 8), torch.zeros(4, 1), 8)
    assert torch.equal(y, torch.zeros(4, 8))


@pytest.mark.parametrize("seed", SEEDS)
def test_nvfp4_structure(seed):
    x = _x(seed, 16, 72)  # 72 = 4 full blocks of 16 + ragged 8
    amax = x.abs().amax()
    q, s, g = nvfp4_quantize(x, amax)
    assert _on_grid(q, E2M1.grid())
    assert _on_grid(s, E4M3.grid())  # block scales are FP8-representable
    y = fake_quant_nvfp4(x, amax)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # error per element is at most half the largest E2M1 step (1.0 between 4 and 6) times its block scale
    err = to_blocks((y - x).abs(), 16)
    assert torch.all(err <= (s * g) * 1.0 + 1e-6)
    rel = (y - x).norm() / x.norm()
    assert rel < 0.15


@pytest.mark.parametrize("name,elem", [("mxfp4", E2M1), ("mxfp8", E4M3)])
@pytest.mark.parametrize("seed", SEEDS)
def test_mx_power_of_two_scales(name, elem, seed):
    x = _x(seed, 8, 100)
    y = fake_quant_mx(x, name)
    xb, yb = to_blocks(x, 32), to_blocks(y, 32)
    amax = xb.abs().amax(-1, keepdim=True)
    scale = torch.exp2(torch.floor(torch.log2(amax)) - elem.emax)
    assert _on_grid(yb / scale, elem.grid())
    assert torch.isfinite(y).all()
    assert ((y - x).norm() / x.norm()) < (0.2 if name == "mxfp4" else 0.05)


def test_nf4_codes_scales_and_storage():
    w = _x(0, 64, 576, scale=0.02)
    t = nf4_quantize(w)
    assert t.codes.max() <= 15 and t.codes.dtype == torch.uint8
    y = nf4_dequantize(t)
    assert y.shape == w.shape
    # every dequantized weight is a codebook level times its (double-quantized) block absmax
    assert ((y - w).norm() / w.norm()) < 0.12
    assert t.bits_per_weight() == pytest.approx(4.127, abs=0.002)
    assert torch.equal(fake_quant_nf4(w), y)
    assert NF4_CODEBOOK[7] == 0 and len(NF4_CODEBOOK) == 16
