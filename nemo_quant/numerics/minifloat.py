"""Exact round-to-nearest-even onto a minifloat grid (E4M3, E5M2, E2M1, ...), in pure torch.

This is the reference every faster path (torch float8 casts, kernels) is tested against.
Values are rounded in fp32 arithmetic that is exact for these grids: each step is a power
of two (from the exact exponent of x), so x / step and its rounding introduce no error
beyond the rounding itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MiniFloat:
    name: str
    exp_bits: int
    man_bits: int
    max_value: float  # largest finite magnitude (E4M3fn: 448, no infinities)

    @property
    def bias(self) -> int:
        return 2 ** (self.exp_bits - 1) - 1

    @property
    def min_normal_exp(self) -> int:
        return 1 - self.bias

    @property
    def emax(self) -> int:
        """Exponent of the largest power of two on the grid (MX scale rule uses it)."""
        return int(torch.tensor(self.max_value).log2().floor())

    def grid(self) -> torch.Tensor:
        """Every non-negative representable value, ascending (for tests)."""
        values = {0.0}
        for e in range(self.min_normal_exp, self.emax + 1):
            for m in range(2 ** self.man_bits):
                values.add((1 + m / 2 ** self.man_bits) * 2.0 ** e)
        for m in range(1, 2 ** self.man_bits):  # subnormals
            values.add(m / 2 ** self.man_bits * 2.0 ** self.min_normal_exp)
        return torch.tensor(sorted(v for v in values if v <= self.max_value))


E4M3 = MiniFloat("e4m3", 4, 3, 448.0)
E5M2 = MiniFloat("e5m2", 5, 2, 57344.0)
E2M1 = MiniFloat("e2m1", 2, 1, 6.0)


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2(x)) for positive fp32 x, exactly (fp32 subnormals included).

    torch.log2 rounds: just below 2^k it can return k (for x near the fp32 maximum that
    makes an MX scale overflow), so the exponent comes from frexp instead."""
    return (torch.frexp(x.float()).exponent - 1).float()


def round_to_minifloat(x: torch.Tensor, fmt: MiniFloat) -> torch.Tensor:
    """Round fp32 `x` to the nearest value of `fmt` (ties to even), saturating at +-max."""
    x = x.float()
    mag = x.abs().clamp(max=fmt.max_value)
    exp = floor_log2(mag.clamp(min=2.0 ** fmt.min_normal_exp))
    step = torch.exp2(exp - fmt.man_bits)
    q = torch.round(mag / step) * step  # torch.round is round-half-to-even
    return torch.copysign(q.clamp(max=fmt.max_value), x)
