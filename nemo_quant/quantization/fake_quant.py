"""Fake quantization: the pure-torch reference per format, the kernel dispatch in front of it,
and the straight-through estimator around both."""
from __future__ import annotations

import torch

from nemo_quant.numerics.blocks import to_blocks
from nemo_quant.numerics.fp8 import fake_quant_fp8
from nemo_quant.numerics.integer import fake_quant_int, fake_quant_int_blocks
from nemo_quant.numerics.mx import fake_quant_mx
from nemo_quant.numerics.nf4 import fake_quant_nf4
from nemo_quant.numerics.nvfp4 import fake_quant_nvfp4
from nemo_quant.quantization.config import FP8, INT_BITS, Granularity, QFormat, QuantizerSpec, Ste
from nemo_quant.quantization.kernel_dispatch import backend_for, report_reference_layout


def reference_fake_quant(x: torch.Tensor, spec: QuantizerSpec, amax: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` in pure torch: the numerics every kernel must reproduce."""
    fmt = QFormat(spec.format)
    block = spec.effective_block_size()
    if fmt in INT_BITS:
        if Granularity(spec.granularity) == Granularity.block:
            return fake_quant_int_blocks(x, amax, INT_BITS[fmt], block)
        return fake_quant_int(x, amax, INT_BITS[fmt])
    if fmt in FP8:
        return fake_quant_fp8(x, amax, fmt.value)
    if fmt == QFormat.nvfp4:
        return fake_quant_nvfp4(x, amax, block)
    if fmt in (QFormat.mxfp4, QFormat.mxfp8):
        return fake_quant_mx(x, fmt.value, block)
    if fmt == QFormat.nf4:
        return fake_quant_nf4(x, block)
    raise ValueError(f"unknown format {spec.format}")


def fake_quant(x: torch.Tensor, spec: QuantizerSpec, amax: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` (no gradient logic). `amax` is shaped for broadcasting."""
    backend = backend_for(x.device)
    if backend is not None:
        out = backend.fake_quant(x.detach(), spec, amax)
        if out is not None:
            return out
        report_reference_layout(QFormat(spec.format).value, x, amax)
    return reference_fake_quant(x, spec, amax)


def abs_max(x: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """|x| maxima in x's dtype: of the whole tensor (block None), or per `block` columns of
    the last dim ([..., blocks]; block = x.shape[-1] gives one per row), NaN-propagating."""
    backend = backend_for(x.device)
    if backend is not None and backend.supports(x) and (block is None or x.dim() > 0):
        x = x.detach().contiguous()
        if block is None:
            return backend.absmax(x, 0).to(x.dtype)
        return backend.absmax(x, block).reshape(*x.shape[:-1], -1).to(x.dtype)
    if block is None:
        return x.abs().amax()
    return to_blocks(x, block).abs().amax(dim=-1)


class _StraightThrough(torch.autograd.Function):
    """Forward: the fake-quantized tensor. Backward: the gradient unchanged, or zeroed where
    |x| > amax (clipped). One kernel call forward, at most one mask backward."""

    @staticmethod
    def forward(ctx, x, amax, spec, clipped):
        if clipped:
            ctx.save_for_backward(x, amax)
        ctx.clipped = clipped
        return fake_quant(x, spec, amax)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.clipped:
            return grad, None, None, None
        x, amax = ctx.saved_tensors
        return grad * (x.abs() <= amax).to(grad.dtype), None, None, None


def fake_quant_ste(x: torch.Tensor, spec: QuantizerSpec, amax: torch.Tensor) -> torch.Tensor:
    """Forward: fake-quantized x. Backward: identity (plain) or identity inside [-amax, amax]."""
    if not x.requires_grad:
        return fake_quant(x, spec, amax)
    clipped = Ste(spec.ste) == Ste.clipped and amax.numel() > 0 and Granularity(spec.granularity) != Granularity.block
    return _StraightThrough.apply(x, amax.detach(), spec, clipped)
