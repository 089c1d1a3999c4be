"""What every kernel backend shares: the format switch and the scale layouts kernels take.

A backend implements a few primitives over a contiguous tensor viewed as [rows, cols]
(`int_`, `fp8`, `nvfp4`, `mx`, `nf4`, `absmax`); `fake_quant` maps a quantizer's spec and
amax onto them and returns None for the (rare) layouts no kernel takes, which the
dispatcher then reports once and runs on the reference.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_quant.kernels.formats import minifloat_id
from nemo_quant.numerics.fp8 import FP8_FORMATS
from nemo_quant.numerics.blocks import num_blocks
from nemo_quant.numerics.mx import MX_ELEMENTS
from nemo_quant.numerics.nf4 import double_quantized_absmax
from nemo_quant.quantization.config import FP8, INT_BITS, Granularity, QFormat, QuantizerSpec

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class ScaleLayout:
    """amax as the kernels read it: one fp32 value, or [rows, blocks] with `block` columns
    per scale (0 = the whole row)."""

    amax: torch.Tensor
    block: int


def scale_layout(x: torch.Tensor, amax: torch.Tensor, block_size: int | None) -> ScaleLayout | None:
    """The kernel layout of an amax broadcast against x, or None if it has none.

    block_size: the block granularity's size, or None for per-tensor / per-row / per-element
    amax (an amax shaped like x gives one scale per element: TP-sliced blocks)."""
    a = amax.detach().float()
    if a.numel() == 1:
        return ScaleLayout(a.reshape(1).contiguous(), 0)
    if x.dim() < 2 or a.dim() != x.dim() or a.shape[:-1] != x.shape[:-1]:
        return None
    cols = x.shape[-1]
    if block_size is not None and a.shape[-1] == num_blocks(cols, block_size):
        return ScaleLayout(a.contiguous(), block_size)
    if block_size is None and a.shape[-1] == 1:
        return ScaleLayout(a.contiguous(), 0)
    if block_size is None and a.shape[-1] == cols:
        return ScaleLayout(a.contiguous(), 1)
    return None


class KernelBackend:
    name = "kernels"
    description = ""

    # -- primitives (subclasses) -------------------------------------------------------------
    def int_(self, x: torch.Tensor, layout: ScaleLayout, bits: int) -> torch.Tensor:
        raise NotImplementedError

    def fp8(self, x: torch.Tensor, layout: ScaleLayout, fmt_id: int) -> torch.Tensor:
        raise NotImplementedError

    def nvfp4(self, x: torch.Tensor, amax: torch.Tensor, block: int) -> torch.Tensor:
        raise NotImplementedError

    def mx(self, x: torch.Tensor, fmt_id: int, block: int) -> torch.Tensor:
        raise NotImplementedError

    def nf4(self, x: torch.Tensor, absmax_dq: torch.Tensor, block: int) -> torch.Tensor:
        raise NotImplementedError

    def nf4_dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, block: int, dtype: torch.dtype) -> torch.Tensor:
        """Packed NF4 codes [rows, cols/2] (high nibble first) and fp32 absmax [rows, cols/block]
        -> [rows, cols] in `dtype` (numerics.nf4.dequantize_packed_reference)."""
        raise NotImplementedError

    def absmax(self, x: torch.Tensor, block: int) -> torch.Tensor:
        """fp32 |x| maxima: [rows, blocks] per `block` columns, or one value (block=0)."""
        raise NotImplementedError

    # -- the format switch ---------------------------------------------------------------------
    def supports(self, x: torch.Tensor) -> bool:
        return x.dtype in KERNEL_DTYPES and x.numel() > 0

    def fake_quant(self, x: torch.Tensor, spec: QuantizerSpec, amax: torch.Tensor) -> torch.Tensor | None:
        """Same result as nemo_quant.quantization.fake_quant.reference_fake_quant, or None."""
        if not self.supports(x):
            return None
        x = x.contiguous()  # kernels index a dense [rows, cols] view
        fmt, block = QFormat(spec.format), spec.effective_block_size()
        per_block = Granularity(spec.granularity) == Granularity.block
        if fmt in INT_BITS or fmt in FP8:
            layout = scale_layout(x, amax, block if per_block else None)
            if layout is None:
                return None
            if fmt in INT_BITS:
                return self.int_(x, layout, INT_BITS[fmt])
            return self.fp8(x, layout, minifloat_id(FP8_FORMATS[fmt.value][0]))
        if fmt == QFormat.nvfp4:
            return self.nvfp4(x, amax.detach().float().reshape(1), block) if amax.numel() == 1 else None
        if fmt in (QFormat.mxfp4, QFormat.mxfp8):
            return self.mx(x, minifloat_id(MX_ELEMENTS[fmt.value]), block)
        if fmt == QFormat.nf4:
            absmax = self.absmax(x, block)
            return self.nf4(x, double_quantized_absmax(absmax.reshape(-1)).contiguous(), block)
        return None
