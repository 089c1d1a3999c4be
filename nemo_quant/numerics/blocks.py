"""Reshaping along the last dim into fixed-size blocks, with a ragged (zero-padded) last block.

Zero padding never changes a block's absolute maximum, so scales of a ragged block are
those of its real elements; padding is cut off again after quantization.
"""
from __future__ import annotations

import torch


def num_blocks(length: int, block_size: int) -> int:
    return -(-length // block_size)


def to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """[..., n] -> [..., ceil(n / block), block]."""
    n = x.shape[-1]
    pad = num_blocks(n, block_size) * block_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], -1, block_size)


def from_blocks(xb: torch.Tensor, length: int) -> torch.Tensor:
    return xb.reshape(*xb.shape[:-2], -1)[..., :length]
