"""Sparse linear layers: a Column/RowParallelLinear whose GEMM reads W * mask.

Conversion stacks `SparseLinearMixin` on the module's class (models/gemm_operands.py) and
adds `sparse_mask`, a bool buffer shaped like the local weight, split over TP like the weight
(gated fc1 rows resharded like the weight's [gate_r; up_r]). Because the forward multiplies
by the mask, a pruned weight gets a zero gradient and stays exactly zero under any optimizer
that moves only weights with gradient (AdamW, SGD, with or without weight decay). Quantization
stacked on top sees the masked weight, so no scale can revive a pruned weight.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.mode_patterns import linears_with_hits
from nemo_quant.models.gemm_operands import GemmOperandsMixin, mark_linear_layout, stacked_class
from nemo_quant.sparsity.config import SparsityConfig

MASK = "sparse_mask"


class SparseLinearMixin(GemmOperandsMixin):
    def gemm_operands(self, input, weight):
        input, weight = super().gemm_operands(input, weight)
        return input, weight * self.sparse_mask.to(weight.dtype)

    def tp_axis_map(self) -> dict[str, int]:
        return {**super().tp_axis_map(), MASK: self._nq_weight_tp_axis}

    def swiglu_row_keys(self) -> list[str]:
        return [*super().swiglu_row_keys(), MASK]

    def apply_mask_to_weight(self) -> None:
        with torch.no_grad():
            self.weight.mul_(self.sparse_mask.to(self.weight.dtype))


@dataclass
class SparsityPlan:
    layers: list[tuple[str, nn.Module]] = field(default_factory=list)  # (global name, module)
    exclude_hits: list[int] = field(default_factory=list)


def plan_sparsity(model: nn.Module, cfg: SparsityConfig) -> SparsityPlan:
    """The decoder/output linear layers the mode prunes, with the shape checks that refuse a
    layer (run by the preflight before any work)."""
    plan = SparsityPlan(exclude_hits=[0] * len(cfg.exclude))
    for name, module, axis, hits in linears_with_hits(model, cfg.exclude, SparseLinearMixin):
        for i in hits:
            plan.exclude_hits[i] += 1
        if hits:
            continue
        _check_layer(model, name, module, axis, cfg)
        plan.layers.append((name, module))
    return plan


def _check_layer(model: nn.Module, name: str, module: nn.Module, axis: int, cfg: SparsityConfig) -> None:
    m = cfg.m
    if name == "output_layer" and (getattr(model, "share_embeddings_and_output_weights", False) or module.weight is None):
        raise ConfigError("sparsity would prune output_layer, whose weight is the (tied) embedding table: keep "
                          "'output_layer' in sparsity.exclude.")
    full_in = module.input_size
    if full_in % m:
        raise ConfigError(f"sparsity.m={m} does not divide the input dim {full_in} of {name}; choose an m that "
                          f"divides it or add {name!r} to sparsity.exclude.")
    local_in = module.weight.shape[1]
    if axis == 1 and local_in % m:
        raise ConfigError(f"{name}: at this TP each rank holds {local_in} of its {full_in} input columns, which "
                          f"splits a group of sparsity.m={m} across ranks; choose a parallel.tp that keeps "
                          f"{full_in} / TP a multiple of {m}.")


def convert_to_sparse(module: nn.Module, name: str, weight_tp_axis: int) -> None:
    mark_linear_layout(module, name, weight_tp_axis)
    module.register_buffer(MASK, torch.ones(module.weight.shape, dtype=torch.bool, device=module.weight.device))
    module.__class__ = stacked_class(module, SparseLinearMixin, "Sparse")


def sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(local name, module) of every sparse linear layer of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SparseLinearMixin)]


def mask_problems(model: nn.Module, n: int, m: int) -> str | None:
    """Why this rank's masks are not an n:m pattern (masks never chosen), or None."""
    from nemo_quant.sparsity.patterns import pattern_violations

    for name, module in sparse_layers(model):
        bad = pattern_violations(module.sparse_mask, n, m)
        if bad:
            return (f"{name}: {bad} groups of its sparsity mask keep more than {n} of {m}; the masks were never "
                    "chosen: run nemo_quant.sparsity.sparsify(model, forward_loop) after applying the mode.")
    return None
