"""y = x W^T for a frozen W that is materialized when needed and never kept.

The forward materializes W (dequantizes NF4, or casts a plain frozen weight), multiplies and
drops it; the backward materializes it again for dL/dx = dL/dy W and returns no weight
gradient. Nothing of W's size, and not the input either, is saved between the two passes:
that is what keeps a QLoRA step's memory at the packed base plus activations.
"""
from __future__ import annotations

from typing import Callable

import torch


class FrozenMatmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, materialize: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
        ctx.materialize = materialize
        return torch.nn.functional.linear(x, materialize(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.matmul(ctx.materialize(grad.dtype)), None


def frozen_linear(x: torch.Tensor, materialize: Callable[[torch.dtype], torch.Tensor]) -> torch.Tensor:
    return FrozenMatmul.apply(x, materialize)
