"""NVFP4: E2M1 values, one FP8-E4M3 scale per 16 elements, one fp32 global scale.

Two-level scaling (as TensorRT-LLM and Blackwell tensor cores define it):
  global_scale = amax_tensor / (6 * 448)
  block_scale  = e4m3(amax_block / 6 / global_scale)      # stored as FP8
  x_q          = e2m1(x / (block_scale * global_scale))    # stored as 4-bit codes
Runs on CPU in pure torch.
"""
from __future__ import annotations

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks
from nemo_quant.numerics.minifloat import E2M1, E4M3, round_to_minifloat

NVFP4_BLOCK = 16


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    return torch.where(amax > 0, amax.float() / (E2M1.max_value * E4M3.max_value), torch.ones_like(amax, dtype=torch.float32))


def nvfp4_block_scales(xb: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """FP8-representable per-block scales (as fp32), shape [..., blocks, 1]."""
    block_amax = xb.abs().amax(dim=-1, keepdim=True).float()
    scales = round_to_minifloat((block_amax / E2M1.max_value / global_scale).clamp(max=E4M3.max_value), E4M3)
    # A block whose scale underflows to 0 is all (near-)zero; use 1 to avoid 0/0.
    return torch.where(scales > 0, scales, torch.ones_like(scales))


def nvfp4_quantize(x: torch.Tensor, amax: torch.Tensor, block_size: int = NVFP4_BLOCK):
    """E2M1 values (fp32), per-block FP8 scales and the global scale."""
    xb = to_blocks(x.float(), block_size)
    g = nvfp4_global_scale(amax)
    s = nvfp4_block_scales(xb, g)
    q = round_to_minifloat(xb / (s * g), E2M1)
    return q, s, g


def fake_quant_nvfp4(x: torch.Tensor, amax: torch.Tensor, block_size: int = NVFP4_BLOCK) -> torch.Tensor:
    q, s, g = nvfp4_quantize(x, amax, block_size)
    return from_blocks(q * s * g, x.shape[-1]).to(x.dtype)
