"""Tensors and quantizer specs every kernel is checked on: random, edge and ragged."""
from __future__ import annotations

import torch

from nemo_quant.numerics.blocks import to_blocks
from nemo_quant.quantization.config import QuantizerSpec

# (format, granularity, block_size): every layout the quantizers produce, ragged blocks included.
SPECS = [
    ("int8", "tensor", 0), ("int8", "channel", 0), ("int8", "block", 7), ("int4", "channel", 0),
    ("int4", "block", 128), ("int4", "block", 48), ("fp8_e4m3", "tensor", 0), ("fp8_e4m3", "channel", 0),
    ("fp8_e5m2", "tensor", 0), ("nvfp4", "block", 16), ("mxfp4", "block", 32), ("mxfp8", "block", 32),
    ("nf4", "block", 64),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def spec_of(case) -> QuantizerSpec:
    fmt, gran, block = case
    return QuantizerSpec(format=fmt, granularity=gran, block_size=block)


def amax_for(x: torch.Tensor, spec: QuantizerSpec, clip: float = 1.0) -> torch.Tensor:
    """The amax a calibrated quantizer would hold for x (scaled by `clip` < 1 to saturate)."""
    xf = x.float()
    if spec.granularity == "tensor" or spec.format == "nvfp4":
        return xf.abs().amax() * clip
    if spec.granularity == "channel":
        return xf.abs().amax(dim=-1, keepdim=True) * clip
    return to_blocks(xf, spec.effective_block_size()).abs().amax(dim=-1) * clip


def edge_values(dtype: torch.dtype) -> torch.Tensor:
    """Zeros of both signs, subnormals, powers of two and their neighbours, format maxima,
    rounding ties and huge values -- all finite in `dtype`."""
    big = torch.finfo(dtype).max
    powers = 2.0 ** torch.arange(-40, 40, dtype=torch.float64)
    values = torch.cat([
        torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, 1.17e-38, 5.96e-8, 6e-5, 448, 449, 464, 480, 57344, 6, 5, 0.25, 0.75,
                      2.5, 3.5, -2.5, 1e30, -1e30, 3e38, big, -big], dtype=torch.float64),
        powers, -powers, torch.nextafter(powers, torch.zeros_like(powers)), torch.nextafter(powers, torch.full_like(powers, 1e300)),
        torch.arange(-20, 20, dtype=torch.float64) + 0.5,
    ])
    values = values.clamp(-big, big).to(dtype)
    return values[values.isfinite()]


def tensors(dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """2-D tensors with ragged last blocks, a wide dynamic range, edge values and all-zero rows."""
    g = torch.Generator().manual_seed(seed)
    wide = (torch.randn(13, 300, generator=g) * torch.logspace(-3, 3, 300)).to(dtype)
    edges = edge_values(dtype)
    n = edges.numel()
    edge = torch.cat([edges, torch.zeros(-n % 64, dtype=dtype)]).reshape(-1, 64)
    edge = torch.cat([edge, edge.flip(0) * 0.37], dim=1).to(dtype)  # mixes scales within blocks
    zero_rows = torch.randn(6, 100, generator=g).to(dtype)
    zero_rows[1] = 0
    zero_rows[4, :50] = 0
    return [wide, edge, zero_rows]
