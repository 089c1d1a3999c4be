"""The one hook every mode uses on a Megatron linear layer: the operands of its GEMM.

Modes convert a Column-/RowParallelLinear in place by swapping its class for a subclass that
stacks mixins (`Quant(Sparse(ColumnParallelLinear))`). Each mixin extends `gemm_operands`
cooperatively (super() first), so the order is fixed by the stacking: the statistics
observer sees the raw input, then sparsity masks the weight, then quantization scales and
fake-quantizes. `_forward_impl` (Megatron's GEMM entry) and the canonical calibration GEMMs
both consume `gemm_operands`, so no mode re-implements Megatron's forward.

The TP layout every mode needs is marked once on the module (`mark_linear_layout`) and each
mixin names its own per-row / per-column tensors for the sharded checkpoint
(`tp_axis_map`, `swiglu_row_keys`), so masks, amax and scales reshard with their weight.
"""
from __future__ import annotations

import torch
from torch import nn


def mark_linear_layout(module: nn.Module, name: str, weight_tp_axis: int) -> None:
    """Record the TP facts the modes ask: the weight's split axis (0 column, 1 row parallel) and
    whether this is a gated fc1 (per-rank [gate_r; up_r] rows)."""
    module._nq_weight_tp_axis = weight_tp_axis
    module._nq_swiglu = name.endswith("linear_fc1") and bool(getattr(module.config, "gated_linear_unit", False))


def megatron_type(module: nn.Module) -> type:
    """The Megatron class under any stack of mode mixins."""
    return getattr(type(module), "_nq_megatron_type", type(module))


def stacked_class(module: nn.Module, mixin: type, prefix: str) -> type:
    """`prefix<Type>(mixin, type(module))`, one class per (mixin, current type)."""
    key = (mixin, type(module))
    if key not in _CLASSES:
        base = type(module)
        _CLASSES[key] = type(f"{prefix}{base.__name__}", (mixin, base), {"_nq_megatron_type": megatron_type(module)})
    return _CLASSES[key]


_CLASSES: dict[tuple[type, type], type] = {}


class GemmOperandsMixin:
    """Base of every linear-layer mixin: `_forward_impl` consumes `gemm_operands`."""

    _nq_observer = None

    def _forward_impl(self, input, weight, *args, **kwargs):
        input, weight = self.gemm_operands(input, weight)
        return super()._forward_impl(input, weight, *args, **kwargs)

    def gemm_operands(self, input: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, weight) as the GEMM consumes them; mixins extend this (super() first)."""
        if self._nq_observer is not None:
            self._nq_observer(input)
        return input, weight

    def tp_axis_map(self) -> dict[str, int]:
        """State-dict key -> TP split axis; keys not named are replicated."""
        axis = self._nq_weight_tp_axis
        return {"weight": axis, **({"bias": 0} if axis == 0 else {})}

    def swiglu_row_keys(self) -> list[str]:
        """Keys (beyond weight/bias, which Megatron's MLP handles) whose rows follow a gated fc1's."""
        return []

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axis_map = self.tp_axis_map()
        sharded = make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axis_map, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"),
        )
        if getattr(self, "_nq_swiglu", False):
            for key in self.swiglu_row_keys():
                if axis_map.get(key) == 0 and f"{prefix}{key}" in sharded:
                    sharded[f"{prefix}{key}"] = apply_swiglu_sharded_factory(
                        sharded[f"{prefix}{key}"], sharded_offsets, (metadata or {}).get("singleton_local_shards", False))
        return sharded
