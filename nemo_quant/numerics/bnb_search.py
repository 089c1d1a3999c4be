"""bitsandbytes' CPU search for the 8-bit code of a normalised value (its 65,536-entry table).

bnb 0.50's C++ `quantize_blockwise` (the second level of NF4's double quantization) does not
pick the exact nearest entry of its dynamic map: it maps v in [-1, 1] to one of 65,536 evenly
spaced points, idx = trunc(fma((v + 1) / 2, 65535, 0.5)), and reads a table built once from the
map's midpoints (entry i = how many midpoints lie below 2i/65535 - 1, searched with a pointer
that only moves forward). Near a midpoint this differs from the nearest entry (a few codes per
large tensor), so matching bnb byte for byte means following the table. All in fp32, as bnb.
"""
from __future__ import annotations

import functools

import torch

_TABLE = 65536


@functools.lru_cache(maxsize=4)
def _table(code_key: tuple[float, ...]) -> torch.Tensor:
    code = torch.tensor(code_key, dtype=torch.float32)
    mids = (code[:-1] + code[1:]) * 0.5
    i = torch.arange(_TABLE, dtype=torch.float32)
    points = (i + i) / torch.tensor(65535.0) - 1.0
    # The forward-only pointer stops at the first midpoint >= the point, even on an unsorted map.
    return torch.searchsorted(torch.cummax(mids, dim=0).values.contiguous(), points, right=False).to(torch.uint8)


def lookup_nearest(v: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """uint8 codes bnb assigns to normalised fp32 values `v` (already clamped to [-1, 1])."""
    table = _table(tuple(code.float().cpu().tolist())).to(v.device)
    half = (v.float() + 1.0) * 0.5
    # fma(h, 65535, 0.5) rounds once: h is a multiple of 2^-25, so the float64 product-sum is
    # exact and one cast to fp32 is that single rounding.
    index = (half.double() * 65535.0 + 0.5).float().trunc().long() & 0xFFFF
    return table[index]
