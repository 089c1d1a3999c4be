"""Format dispatch for fake quantization, and the straight-through estimator around it."""
from __future__ import annotations

import torch

from nemo_quant.numerics.fp8 import fake_quant_fp8
from nemo_quant.numerics.integer import fake_quant_int, fake_quant_int_blocks
from nemo_quant.numerics.mx import fake_quant_mx
from nemo_quant.numerics.nf4 import fake_quant_nf4
from nemo_quant.numerics.nvfp4 import fake_quant_nvfp4
from nemo_quant.quantization.config import FP8, INT_BITS, Granularity, QFormat, QuantizerSpec, Ste


def fake_quant(x: torch.Tensor, spec: QuantizerSpec, amax: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize `x` (no gradient logic). `amax` is shaped for broadcasting."""
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


def fake_quant_ste(x: torch.Tensor, spec: QuantizerSpec, amax: torch.Tensor) -> torch.Tensor:
    """Forward: fake-quantized x. Backward: identity (plain) or identity inside [-amax, amax]."""
    with torch.no_grad():
        q = fake_quant(x, spec, amax)
    if not x.requires_grad:
        return q
    if Ste(spec.ste) == Ste.clipped and amax.numel() and Granularity(spec.granularity) != Granularity.block:
        mask = (x.abs() <= amax).to(x.dtype)
        return q + (x - x.detach()) * mask
    return q + (x - x.detach())
