"""Every kernel equals the pure-torch reference bit for bit: C++ on CPU, Triton on CUDA, and
the same Triton code under its interpreter on CPU (how CI, which has no GPU, checks it)."""
from __future__ import annotations

import os

import pytest
import torch

from nemo_quant.numerics.blocks import to_blocks
from nemo_quant.numerics.nf4 import (
    dequantize_packed_reference, nf4_block_absmax, nf4_dequantize, nf4_quantize, pack_nf4,
)
from nemo_quant.quantization.fake_quant import fake_quant_ste, reference_fake_quant
from tests.kernel_cases import DTYPES, SPECS, amax_for, spec_of, tensors

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _cpu():
    from nemo_quant.kernels.cpu_ops import CpuKernels

    return CpuKernels(), "cpu"


def _triton_interpreted():
    if not INTERPRETED:
        pytest.skip("the Triton interpreter runs on machines without CUDA (tests/conftest.py sets TRITON_INTERPRET)")
    from nemo_quant.kernels.triton_ops import TritonKernels

    return TritonKernels(), "cpu"


def _triton_cuda():
    from nemo_quant.kernels.triton_ops import TritonKernels

    return TritonKernels(), "cuda"


@pytest.fixture(params=[
    pytest.param(_cpu, id="cpu"),
    pytest.param(_triton_interpreted, id="triton-interpreted"),
    pytest.param(_triton_cuda, id="triton-cuda", marks=pytest.mark.gpu),
], scope="module")
def backend(request):
    return request.param()


def _assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, what
    bad = ~((got == want) | (got.isnan() & want.isnan()))
    assert not bad.any(), f"{what}: {int(bad.sum())} of {bad.numel()} differ, e.g. {got[bad][:4]} vs {want[bad][:4]}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", SPECS, ids=lambda c: "-".join(map(str, c)))
def test_fake_quant_equals_reference(backend, case, dtype):
    kernels, device = backend
    spec = spec_of(case)
    for i, x in enumerate(tensors(dtype)):
        for clip in (1.0, 0.5):  # calibrated, and an amax that saturates half the range
            amax = amax_for(x, spec, clip)
            got = kernels.fake_quant(x.to(device), spec, amax.to(device))
            assert got is not None, f"{case} has no kernel"
            _assert_same(got.cpu(), reference_fake_quant(x, spec, amax), f"{case} {dtype} tensor {i} clip {clip}")


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_ties_round_to_even(backend, bits):
    kernels, device = backend
    qmax = 2 ** (bits - 1) - 1
    x = (torch.arange(-qmax - 3, qmax + 3, dtype=torch.float32) + 0.5).reshape(1, -1)
    spec = spec_of((f"int{bits}", "tensor", 0))
    got = kernels.fake_quant(x.to(device), spec, torch.tensor(float(qmax), device=device)).cpu()
    assert torch.equal(got, torch.round(x).clamp(-qmax - 1, qmax))  # scale 1: codes are the values


def test_shapes_ragged_and_long_rows(backend):
    kernels, device = backend
    g = torch.Generator().manual_seed(1)
    transposed = torch.randn(64, 48, generator=g).t()  # non-contiguous (algorithms pass views)
    for x in [torch.randn(*shape, generator=g) for shape in [(5,), (1, 100_003), (3, 4, 50), (2, 1)]] + [transposed]:
        shape = tuple(x.shape)
        for case in [("int8", "tensor", 0), ("fp8_e4m3", "tensor", 0), ("nvfp4", "block", 16), ("mxfp4", "block", 32)]:
            spec = spec_of(case)
            amax = x.abs().amax()
            _assert_same(kernels.fake_quant(x.to(device), spec, amax.to(device)).cpu(), reference_fake_quant(x, spec, amax),
                         f"{case} {shape}")


def test_per_element_amax_of_tp_sliced_blocks(backend):
    """Row-parallel shards whose blocks straddle ranks quantize with one amax per column."""
    kernels, device = backend
    x = torch.randn(8, 40)
    amax = torch.rand(8, 40) + 0.5
    spec = spec_of(("int4", "channel", 0))
    _assert_same(kernels.fake_quant(x.to(device), spec, amax.to(device)).cpu(), reference_fake_quant(x, spec, amax), "sliced")


@pytest.mark.parametrize("block", [0, 1, 16, 48, 300, 1000])
def test_absmax_equals_reference(backend, block):
    kernels, device = backend
    for x in tensors(torch.bfloat16):
        got = kernels.absmax(x.to(device), block).cpu()
        want = x.float().abs().amax() if block == 0 else to_blocks(x.float(), block).abs().amax(dim=-1)
        _assert_same(got.reshape(want.shape), want, f"block {block}")
    x = torch.randn(4, 64)
    x[2, 5] = float("nan")
    got = kernels.absmax(x.to(device), 16).cpu()
    assert got[2, 0].isnan() and not got[[0, 1, 3]].isnan().any()  # a NaN is reported, not dropped
    assert kernels.absmax(x.to(device), 0).isnan()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_dequantize_equals_reference(backend, dtype):
    """The QLoRA base's packed NF4 (two codes per byte, high nibble first) -> weights."""
    kernels, device = backend
    w = torch.randn(24, 320)
    t = nf4_quantize(w)
    packed = pack_nf4(t.codes.reshape(24, -1))
    absmax = nf4_block_absmax(t).reshape(24, -1)
    got = kernels.nf4_dequantize(packed.to(device), absmax.to(device), 64, dtype).cpu()
    want = dequantize_packed_reference(packed, absmax, 64, dtype)
    _assert_same(got, want, "nf4 dequantize")
    assert torch.equal(want, nf4_dequantize(t, dtype))


@pytest.mark.parametrize("ste", ["plain", "clipped"])
def test_straight_through_gradients_match_reference(backend, ste, monkeypatch):
    from nemo_quant.quantization import fake_quant as fq

    kernels, device = backend
    spec = spec_of(("int8", "channel", 0))
    spec.ste = ste
    x = torch.randn(16, 64)
    amax = x.abs().amax(dim=1, keepdim=True) * 0.6
    grad = torch.randn(16, 64)

    def run(select):
        monkeypatch.setattr(fq, "backend_for", lambda dev: select)
        xi = x.to(device).requires_grad_()
        out = fake_quant_ste(xi, spec, amax.to(device))
        out.backward(grad.to(device))
        return out.detach().cpu(), xi.grad.cpu()

    (out_k, grad_k), (out_r, grad_r) = run(kernels), run(None)
    _assert_same(out_k, out_r, "forward")
    _assert_same(grad_k, grad_r, "gradient")
    if ste == "clipped":
        assert (grad_k == 0).any() and (grad_k != 0).any()  # clipping zeroed some gradients only


@pytest.mark.gpu
def test_dispatch_selects_triton_on_cuda():
    from nemo_quant.quantization.kernel_dispatch import backend_for, set_kernel_policy

    set_kernel_policy("kernels")
    try:
        assert backend_for(torch.device("cuda")).name == "triton"
    finally:
        set_kernel_policy(None)
