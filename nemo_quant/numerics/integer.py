"""Symmetric signed INT-n fake quantization (per-tensor, per-channel, per-block).

scale = amax / (2^(n-1) - 1); codes are clamped to [-2^(n-1), 2^(n-1) - 1], the signed range
TensorRT-LLM and ModelOpt use (the extra negative code is reachable only when amax clips).
"""
from __future__ import annotations

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks


def int_max(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def int_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    # An all-zero channel/block gets scale 1: its codes are 0 either way, and no 0/0 appears.
    return torch.where(amax > 0, amax.float() / int_max(bits), torch.ones_like(amax, dtype=torch.float32))


def int_quantize(x: torch.Tensor, amax: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (float tensor of integers) and scale, broadcasting `amax` against `x`."""
    scale = int_scale(amax, bits)
    codes = torch.clamp(torch.round(x.float() / scale), -int_max(bits) - 1, int_max(bits))
    return codes, scale


def fake_quant_int(x: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    codes, scale = int_quantize(x, amax, bits)
    return (codes * scale).to(x.dtype)


def fake_quant_int_blocks(x: torch.Tensor, amax_blocks: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """`amax_blocks` has shape [..., num_blocks]; the last block may be ragged."""
    xb = to_blocks(x, block_size)
    return from_blocks(fake_quant_int(xb, amax_blocks.unsqueeze(-1), bits), x.shape[-1])
