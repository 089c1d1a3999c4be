"""Element-format ids shared by the Python wrappers and the kernels (C++ `kMiniFloats`)."""
from __future__ import annotations

from nemo_quant.numerics.minifloat import E2M1, E4M3, E5M2, MiniFloat

MINIFLOAT_IDS = {E4M3.name: 0, E5M2.name: 1, E2M1.name: 2}
FP8_ELEMENTS = {"fp8_e4m3": E4M3, "fp8_e5m2": E5M2}


def minifloat_id(fmt: MiniFloat) -> int:
    return MINIFLOAT_IDS[fmt.name]
