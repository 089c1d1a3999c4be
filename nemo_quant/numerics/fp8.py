"""FP8 (E4M3 / E5M2) fake quantization with a per-tensor or per-channel fp32 scale.

The fast path casts through torch's float8 dtypes (CPU and GPU); `round_to_minifloat` is the
reference it must match bit for bit.
"""
from __future__ import annotations

import torch

from nemo_quant.numerics.minifloat import E4M3, E5M2, MiniFloat, round_to_minifloat

FP8_FORMATS = {"fp8_e4m3": (E4M3, torch.float8_e4m3fn), "fp8_e5m2": (E5M2, torch.float8_e5m2)}


def fp8_scale(amax: torch.Tensor, fmt: MiniFloat) -> torch.Tensor:
    return torch.where(amax > 0, amax.float() / fmt.max_value, torch.ones_like(amax, dtype=torch.float32))


def fake_quant_fp8(x: torch.Tensor, amax: torch.Tensor, name: str = "fp8_e4m3", reference: bool = False) -> torch.Tensor:
    fmt, dtype = FP8_FORMATS[name]
    scale = fp8_scale(amax, fmt)
    scaled = (x.float() / scale).clamp(-fmt.max_value, fmt.max_value)
    q = round_to_minifloat(scaled, fmt) if reference else scaled.to(dtype).float()
    return (q * scale).to(x.dtype)
