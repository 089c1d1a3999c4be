"""NF4 (QLoRA): 4-bit NormalFloat codes, absmax scale per 64 weights, double-quantized scales.

Double quantization (Dettmers et al. 2023): the fp32 absmax constants, minus their mean,
are quantized to int8 with one fp32 scale per 256 constants. Storage per weight:
4 + 8/64 + 32/(64*256) bits (+ one fp32 mean per tensor) = 4.127 bits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks

NF4_BLOCK = 64
NF4_SCALE_BLOCK = 256

# The 16 NF4 levels: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero.
NF4_CODEBOOK = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
])
# Midpoints between consecutive levels: a value's nearest level is the number of midpoints
# below it (a value on a midpoint takes the lower level).
NF4_MIDPOINTS = (NF4_CODEBOOK[1:] + NF4_CODEBOOK[:-1]) / 2


@dataclass
class NF4Tensor:
    codes: torch.Tensor  # uint8 [..., blocks, 64], values 0..15 (packing is the exporter's job)
    scale_codes: torch.Tensor  # int8, one per block (double-quantized absmax)
    scale_scales: torch.Tensor  # fp32, one per 256 blocks
    scale_mean: torch.Tensor  # fp32 scalar
    shape: tuple[int, ...]

    def bits_per_weight(self) -> float:
        n = 1
        for d in self.shape:
            n *= d
        bits = self.codes.numel() * 4 + self.scale_codes.numel() * 8 + self.scale_scales.numel() * 32 + 32
        return bits / n


def _nearest_code(normalised: torch.Tensor) -> torch.Tensor:
    return torch.bucketize(normalised, NF4_MIDPOINTS.to(normalised.device)).to(torch.uint8)


def _double_quantize(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int8 codes, per-256 fp32 scales and the mean of the flat absmax constants."""
    mean = flat.mean()
    centered = to_blocks(flat - mean, NF4_SCALE_BLOCK)
    s_amax = centered.abs().amax(dim=-1, keepdim=True)
    s_scale = torch.where(s_amax > 0, s_amax / 127, torch.ones_like(s_amax))
    s_codes = torch.clamp(torch.round(centered / s_scale), -127, 127).to(torch.int8)
    return from_blocks(s_codes, flat.numel()), s_scale.squeeze(-1), mean


def _double_dequantize(s_codes: torch.Tensor, s_scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    flat = s_codes.reshape(-1).float()
    sb = to_blocks(flat, NF4_SCALE_BLOCK) * s_scale.unsqueeze(-1)
    return (from_blocks(sb, flat.numel()) + mean).reshape(s_codes.shape)


def double_quantized_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The absmax constants as NF4 stores them (what dequantization multiplies by)."""
    return _double_dequantize(*_double_quantize(absmax.reshape(-1))).reshape(absmax.shape)


def nf4_quantize(w: torch.Tensor, block_size: int = NF4_BLOCK) -> NF4Tensor:
    wb = to_blocks(w.float(), block_size)
    absmax = wb.abs().amax(dim=-1)
    codes = _nearest_code(wb / torch.where(absmax > 0, absmax, torch.ones_like(absmax)).unsqueeze(-1))
    s_codes, s_scale, mean = _double_quantize(absmax.reshape(-1))
    return NF4Tensor(codes, s_codes.reshape(absmax.shape), s_scale, mean, tuple(w.shape))


def nf4_block_absmax(t: NF4Tensor) -> torch.Tensor:
    return _double_dequantize(t.scale_codes, t.scale_scales, t.scale_mean)


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = NF4_CODEBOOK.to(t.codes.device)[t.codes.long()] * nf4_block_absmax(t).unsqueeze(-1)
    return from_blocks(values, t.shape[-1]).reshape(t.shape).to(dtype)


def fake_quant_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK) -> torch.Tensor:
    return nf4_dequantize(nf4_quantize(w, block_size), w.dtype)
