"""NF4 (QLoRA) exactly as bitsandbytes 0.50.2 stores it: the pure-torch reference.

A tensor is cut into blocks of 64 consecutive weights (row-major, like bnb's flat view); each
weight becomes the nearest of 16 NormalFloat levels after scaling by the reciprocal of its
block's absmax. Double quantization (Dettmers et al. 2023): the fp32 absmax constants, minus
their mean (the "offset"), are quantized with bnb's signed 8-bit dynamic map in blocks of 256,
one fp32 "nested absmax" per 256 constants. Storage per weight:
4 + 8/64 + 32/(64*256) bits (+ one fp32 offset per tensor) = 4.127 bits.

Bit-exactness with bnb matters because its consumers (transformers, PEFT, the engines) read
our NF4 base: the level choice uses A * (1 / absmax) and midpoint bucketing like bnb's torch
path, and the 8-bit absmax codes follow bnb's C++ lookup-table search (`bnb_search.lookup_nearest`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks
from nemo_quant.numerics.bnb_search import lookup_nearest

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
NF4_MIDPOINTS = (NF4_CODEBOOK[:-1] + NF4_CODEBOOK[1:]) / 2
_TINY = 1e-38  # bnb's floor under an absmax before taking its reciprocal


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2015): for exponent e = 0..6, 2^e
    fractions (midpoints of a linspace over [0.1, 1]) times 10^(e-6), both signs, plus 0 and 1;
    sorted. The same float32 arithmetic as bnb's `create_dynamic_map(signed=True)`."""
    values: list[float] = []
    for e in range(7):
        edges = torch.linspace(0.1, 1, 2 ** e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (e - 6)) * mids).tolist() + (-(10 ** (e - 6)) * mids).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32)


@dataclass
class NF4Tensor:
    codes: torch.Tensor  # uint8 [..., blocks, 64], values 0..15 (`pack_nf4` packs two per byte)
    scale_codes: torch.Tensor  # uint8, one per block: an index into `dynamic_map()`
    scale_scales: torch.Tensor  # fp32, one per 256 blocks (bnb's nested absmax)
    scale_mean: torch.Tensor  # fp32 scalar (bnb's offset)
    shape: tuple[int, ...]

    def bits_per_weight(self) -> float:
        n = 1
        for d in self.shape:
            n *= d
        bits = self.codes.numel() * 4 + self.scale_codes.numel() * 8 + self.scale_scales.numel() * 32 + 32
        return bits / n


def nf4_level_codes(blocks: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """uint8 level of every weight of `blocks` [..., 64] given its block's fp32 `absmax` [...]."""
    inv = 1.0 / absmax.clamp(min=_TINY)
    scaled = torch.clamp(blocks.float() * inv.unsqueeze(-1), -1, 1)
    return torch.bucketize(scaled, NF4_MIDPOINTS.to(blocks.device), out_int32=True).to(torch.uint8)


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(uint8 codes, fp32 nested absmax per 256, fp32 offset) of a flat fp32 absmax array, as
    bnb's `quantize_4bit(compress_statistics=True)` computes them."""
    flat = absmax.reshape(-1).float().contiguous()
    offset = flat.mean()
    centered = flat - offset
    blocks = to_blocks(centered, NF4_SCALE_BLOCK)
    nested = blocks.abs().amax(dim=-1)
    zero = nested == 0
    scaled = blocks * (1.0 / torch.where(zero, torch.ones_like(nested), nested)).unsqueeze(-1)
    codes = lookup_nearest(torch.clamp(scaled, -1, 1), dynamic_map())
    codes = torch.where(zero.unsqueeze(-1), torch.zeros_like(codes), codes)  # bnb codes an all-zero block 0
    return from_blocks(codes, flat.numel()), nested, offset


def double_dequantize(codes: torch.Tensor, nested: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """fp32 absmax constants back from their 8-bit codes (bnb: code[c] * nested, then + offset)."""
    flat = codes.reshape(-1)
    values = to_blocks(dynamic_map().to(flat.device)[flat.long()], NF4_SCALE_BLOCK) * nested.unsqueeze(-1)
    return (from_blocks(values, flat.numel()) + offset).reshape(codes.shape)


def double_quantized_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """The absmax constants as NF4 stores them (what dequantization multiplies by)."""
    return double_dequantize(*double_quantize(absmax)).reshape(absmax.shape)


def nf4_quantize(w: torch.Tensor, block_size: int = NF4_BLOCK) -> NF4Tensor:
    """Blocks along the last dim (ragged last block per row); equal to bnb's flat blocks when
    the last dim is a multiple of the block size."""
    wb = to_blocks(w.float(), block_size)
    absmax = wb.abs().amax(dim=-1)
    codes = nf4_level_codes(wb, absmax)
    s_codes, nested, offset = double_quantize(absmax)
    return NF4Tensor(codes, s_codes.reshape(absmax.shape), nested, offset, tuple(w.shape))


def nf4_block_absmax(t: NF4Tensor) -> torch.Tensor:
    return double_dequantize(t.scale_codes, t.scale_scales, t.scale_mean)


def nf4_values(codes: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Level times block absmax for codes [..., blocks, block] and fp32 absmax [..., blocks]."""
    return (NF4_CODEBOOK.to(codes.device)[codes.long()] * absmax.unsqueeze(-1)).to(dtype)


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = nf4_values(t.codes, nf4_block_absmax(t))
    return from_blocks(values, t.shape[-1]).reshape(t.shape).to(dtype)


def fake_quant_nf4(w: torch.Tensor, block_size: int = NF4_BLOCK) -> torch.Tensor:
    return nf4_dequantize(nf4_quantize(w, block_size), w.dtype)


# -- packed storage: two codes per byte, the first in the high nibble (bnb's layout) --------
def pack_nf4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., 2n] -> packed [..., n]."""
    return (codes[..., 0::2] << 4) | codes[..., 1::2]


def unpack_nf4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nf4`: [..., n] -> codes [..., 2n]."""
    return torch.stack([packed >> 4, packed & 15], dim=-1).reshape(*packed.shape[:-1], -1)


def dequantize_packed_reference(packed: torch.Tensor, absmax: torch.Tensor, block_size: int,
                                dtype: torch.dtype) -> torch.Tensor:
    """The reference the NF4 dequantization kernels are tested against: packed codes
    [rows, cols/2] and fp32 absmax [rows, cols/block] -> [rows, cols] in `dtype`."""
    codes = to_blocks(unpack_nf4(packed), block_size)
    return from_blocks(nf4_values(codes, absmax.float()), codes.shape[-2] * block_size).to(dtype)
