"""OCP Microscaling: MXFP4 (E2M1) and MXFP8 (E4M3) elements, one E8M0 scale per 32 elements.

Per the OCP MX v1.0 spec the shared scale is 2^(floor(log2(amax_block)) - emax_elem), where
emax_elem is the exponent of the element format's largest normal (E2M1: 2, E4M3: 8);
elements are then rounded (ties to even) and saturated. No calibration: scales are
computed from each block. Runs on CPU in pure torch.
"""
from __future__ import annotations

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks
from nemo_quant.numerics.minifloat import E2M1, E4M3, MiniFloat, floor_log2, round_to_minifloat

MX_BLOCK = 32
MX_ELEMENTS = {"mxfp4": E2M1, "mxfp8": E4M3}
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127


def mx_shared_exponent(xb: torch.Tensor, elem: MiniFloat) -> torch.Tensor:
    block_amax = xb.abs().amax(dim=-1, keepdim=True).float()
    exp = floor_log2(block_amax.clamp(min=2.0 ** -127)) - elem.emax
    return exp.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)


def fake_quant_mx(x: torch.Tensor, name: str, block_size: int = MX_BLOCK) -> torch.Tensor:
    elem = MX_ELEMENTS[name]
    xb = to_blocks(x.float(), block_size)
    scale = torch.exp2(mx_shared_exponent(xb, elem))
    q = round_to_minifloat(xb / scale, elem)
    return from_blocks(q * scale, x.shape[-1]).to(x.dtype)
