"""Element formats by the id the kernels take: the index into C++ `kMiniFloats` (same order)."""
from __future__ import annotations

from nemo_quant.numerics.minifloat import E2M1, E4M3, E5M2, MiniFloat

MINIFLOATS = [E4M3, E5M2, E2M1]


def minifloat_id(fmt: MiniFloat) -> int:
    return MINIFLOATS.index(fmt)
