"""In-place conversion of Megatron modules to their quantized counterparts.

A registry maps Megatron module types to mixins. Conversion swaps the instance's class for a
subclass `Quant<Type>(mixin, Type)` and attaches TensorQuantizers, so parameters, hooks and
Megatron's own forward stay untouched:
- ColumnParallelLinear / RowParallelLinear: input and weight quantized inside
  `_forward_impl`, i.e. on exactly the (local) tensors the GEMM consumes.
- DotProductAttention (core attention): K and V quantized after RoPE, as a KV cache holds them.
Modules of unregistered types are left alone and reported.
"""
from __future__ import annotations

import fnmatch
import re
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import nn

from nemo_quant.models.gemm_operands import GemmOperandsMixin, mark_linear_layout, megatron_type, stacked_class
from nemo_quant.quantization.config import SMOOTHING, Algorithm, QuantConfig, QuantizerSpec
from nemo_quant.quantization.tensor_quantizer import TensorQuantizer


class QuantLinearMixin(GemmOperandsMixin):
    """Column-/row-parallel linear with input and weight quantizers.

    `pre_quant_scale` (SmoothQuant / AWQ layers only) multiplies the GEMM input per channel
    before its quantizer; the weight was divided by it, so the product is unchanged. It is
    the rank's slice of the input dim for row-parallel layers and the whole dim otherwise.
    Quantization is the last step of `gemm_operands`: it sees the weight a sparsity mask
    already applied to, and the input the statistics observer already saw."""

    def gemm_operands(self, input, weight):
        """(input, weight) as the GEMM consumes them: observed, masked, scaled, fake-quantized."""
        input, weight = super().gemm_operands(input, weight)
        if getattr(self, "pre_quant_scale", None) is not None:
            input = input * self.pre_quant_scale.to(input.dtype)
        if self.input_quantizer is not None:
            input = self.input_quantizer(input)
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        return input, weight

    def __repr__(self) -> str:
        # Megatron's linear layers print without children; show the quantizers explicitly.
        lines = [super().__repr__()[:-1]]
        for role in ("input_quantizer", "weight_quantizer"):
            q = getattr(self, role)
            lines.append(f"  ({role}): " + (f"TensorQuantizer({q.extra_repr()})" if q is not None else "None"))
        return "\n".join(lines) + "\n)"

    def tp_axis_map(self) -> dict[str, int]:
        axis_map = super().tp_axis_map()
        if self._nq_weight_tp_axis == 1:
            axis_map["pre_quant_scale"] = 0  # row parallel: split along the input dim
        for role in ("input_quantizer", "weight_quantizer"):
            q = getattr(self, role)
            if q is not None and q.amax_tp_axis is not None:
                axis_map[f"{role}._amax"] = q.amax_tp_axis
        return axis_map

    def swiglu_row_keys(self) -> list[str]:
        # Gated MLP fc1 rows are [gate_r; up_r] per rank: reshard amax rows like the weight.
        return [*super().swiglu_row_keys(), "weight_quantizer._amax"]


class QuantAttentionMixin:
    """Core attention with K/V cache quantizers."""

    def forward(self, query, key, value, *args, **kwargs):
        return super().forward(query, self.k_quantizer(key), self.v_quantizer(value), *args, **kwargs)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        sharded = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        # K/V amax are per tensor and max-reduced over TP: replicated on every rank.
        own = {f"{role}._amax": getattr(self, role).amax for role in ("k_quantizer", "v_quantizer")}
        sharded.update(make_sharded_tensors_for_checkpoint(
            own, prefix, {}, sharded_offsets, tp_group=self.tp_group if hasattr(self, "tp_group") else None,
            dp_cp_group=(metadata or {}).get("dp_cp_group"),
        ))
        return sharded


@dataclass
class RegistryEntry:
    mixin: type
    kind: str  # "linear" or "attention"
    weight_tp_axis: int | None = None  # 0: column parallel (rows split), 1: row parallel


def _build_registry() -> dict[type, RegistryEntry]:
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_quant.models.sdpa_attention import SDPADotProductAttention

    # Transformer Engine modules (TELinear, TELayerNormColumnParallelLinear,
    # TEDotProductAttention) compute their GEMMs inside TE; they are not registered yet and
    # are therefore reported as unconverted rather than half-converted.
    return {
        ColumnParallelLinear: RegistryEntry(QuantLinearMixin, "linear", 0),
        RowParallelLinear: RegistryEntry(QuantLinearMixin, "linear", 1),
        DotProductAttention: RegistryEntry(QuantAttentionMixin, "attention"),
        SDPADotProductAttention: RegistryEntry(QuantAttentionMixin, "attention"),
    }


@dataclass
class ConversionReport:
    converted: Counter = field(default_factory=Counter)
    excluded: list[str] = field(default_factory=list)
    unregistered: Counter = field(default_factory=Counter)
    pattern_hits: list[int] = field(default_factory=list)
    override_hits: list[int] = field(default_factory=list)

    def summary(self) -> str:
        parts = [f"quantized {sum(self.converted.values())} modules ("
                 + ", ".join(f"{k} x{v}" for k, v in sorted(self.converted.items())) + ")"]
        if self.excluded:
            parts.append(f"excluded by quant.exclude: {len(self.excluded)} ({', '.join(self.excluded[:4])}{', ...' if len(self.excluded) > 4 else ''})")
        if self.unregistered:
            parts.append("left in high precision (no quantized counterpart registered): "
                         + ", ".join(f"{k} x{v}" for k, v in sorted(self.unregistered.items())))
        return "; ".join(parts)


def _is_weight_bearing(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim == 2


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")


def global_name(model: nn.Module, name: str) -> str:
    """Module name with the decoder layer index counted over the whole pipeline, so patterns
    and per-layer plans mean the same layers at any PP layout."""
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if not layers or not hasattr(layers[0], "layer_number"):
        return name
    offset = layers[0].layer_number - 1
    return _LAYER.sub(lambda m: f"decoder.layers.{int(m.group(1)) + offset}.", name)


def quantizers(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, TensorQuantizer)]


@dataclass
class PlannedConversion:
    """One module the quantize mode will convert, with the specs it will get."""

    name: str  # global name (layer index counted over the whole pipeline)
    module: nn.Module
    entry: RegistryEntry
    weight_spec: QuantizerSpec | None = None
    input_spec: QuantizerSpec | None = None


def plan_conversion(model: nn.Module, cfg: QuantConfig) -> tuple[list[PlannedConversion], ConversionReport]:
    """What `convert_model` would do, without touching the model: which modules get which
    specs, and the shape checks that would refuse them (the preflight runs this)."""
    registry = _build_registry()
    report = ConversionReport(pattern_hits=[0] * len(cfg.exclude), override_hits=[0] * len(cfg.overrides))
    plan = []
    for local_name, module in list(model.named_modules()):
        name = global_name(model, local_name)
        if isinstance(module, (QuantLinearMixin, QuantAttentionMixin, TensorQuantizer)):
            continue  # already quantized, or one of our quantizers
        entry = registry.get(megatron_type(module))
        if entry is None:
            if _is_weight_bearing(module) and "Embedding" not in type(module).__name__:
                report.unregistered[type(module).__name__] += 1
            continue
        hits = [i for i, p in enumerate(cfg.exclude) if fnmatch.fnmatchcase(name, p)]
        for i in hits:
            report.pattern_hits[i] += 1
        if hits:
            report.excluded.append(name)
            continue
        if entry.kind == "linear":
            weight_spec, input_spec = _linear_specs(cfg, name, report)
            if weight_spec is None and input_spec is None:
                continue
            _check_dynamic_blocks(module, entry, weight_spec, input_spec)
            plan.append(PlannedConversion(name, module, entry, weight_spec, input_spec))
        elif entry.kind == "attention" and cfg.kv_cache is not None:
            plan.append(PlannedConversion(name, module, entry))
    return plan, report


def convert_model(model: nn.Module, cfg: QuantConfig) -> ConversionReport:
    """Attach quantizers to every registered module not matched by `cfg.exclude`."""
    plan, report = plan_conversion(model, cfg)
    for item in plan:
        if item.entry.kind == "linear":
            _convert_linear(item.module, item.entry, cfg, item.name, item.weight_spec, item.input_spec)
        else:
            _convert_attention(item.module, item.entry, cfg)
        report.converted[megatron_type(item.module).__name__] += 1
    return report


def _linear_specs(cfg: QuantConfig, name: str, report: ConversionReport):
    """(weight spec, input spec) of a linear layer: its first matching override, else the defaults."""
    for i, override in enumerate(cfg.overrides):
        if fnmatch.fnmatchcase(name, override.pattern):
            report.override_hits[i] += 1
            return override.weight, override.input
    return cfg.weight, cfg.input


def _convert_linear(module: nn.Module, entry: RegistryEntry, cfg: QuantConfig, name: str,
                    weight_spec: QuantizerSpec | None, input_spec: QuantizerSpec | None) -> None:
    mark_linear_layout(module, name, entry.weight_tp_axis)
    shape = tuple(module.weight.shape)
    module.weight_quantizer = TensorQuantizer(weight_spec, "weight", shape) if weight_spec is not None else None
    module.input_quantizer = TensorQuantizer(input_spec, "input") if input_spec is not None else None
    if Algorithm(cfg.algorithm) in SMOOTHING:
        local_in = shape[1]
        module.register_buffer("pre_quant_scale", torch.ones(local_in, dtype=torch.float32))
    if module.input_quantizer is not None and entry.weight_tp_axis == 1:
        module.input_quantizer.input_split_over_tp = True
    wq = module.weight_quantizer
    if wq is not None and wq.amax.ndim == 2:
        column = entry.weight_tp_axis == 0
        per_channel = wq.per_channel
        if column:
            # Every per-row / per-block amax belongs to the rank's own rows.
            wq.amax_tp_axis, wq.reduce_over_tp = 0, False
        else:
            # Row parallel: the input dim is split, so per-channel maxima and block maxima are
            # reduced over TP; blocks follow global column numbers (identical at any TP).
            wq.amax_tp_axis, wq.reduce_over_tp = None, True
            if not per_channel:
                from megatron.core.utils import get_pg_rank

                wq.use_global_blocks(get_pg_rank(module.tp_group) * module.input_size_per_partition, module.input_size)
    module.__class__ = stacked_class(module, entry.mixin, "Quant")


def _check_dynamic_blocks(module: nn.Module, entry: RegistryEntry, weight_spec, input_spec) -> None:
    """Formats whose block scales come from each block (NVFP4, MX, NF4, block inputs) need the
    per-rank input dim of a row-parallel layer to be a multiple of the block, or blocks would
    depend on TP."""
    from nemo_quant.config.validate import ConfigError
    from nemo_quant.quantization.config import BLOCK_ONLY, Granularity, QFormat

    if entry.weight_tp_axis != 1:
        return
    local_in = module.input_size_per_partition
    for role, spec in (("weight", weight_spec), ("input", input_spec)):
        if spec is None or Granularity(spec.granularity) != Granularity.block:
            continue
        dynamic = QFormat(spec.format) in BLOCK_ONLY or role == "input"
        if dynamic and local_in % spec.effective_block_size():
            raise ConfigError(
                f"quant.{role}.block_size={spec.effective_block_size()} does not divide the per-rank input "
                f"dim {local_in} of a row-parallel layer ({module.input_size} / TP); choose a parallel.tp "
                "that keeps it a multiple of the block."
            )


def _convert_attention(module: nn.Module, entry: RegistryEntry, cfg: QuantConfig) -> None:
    module.k_quantizer = TensorQuantizer(cfg.kv_cache, "kv_cache")
    module.v_quantizer = TensorQuantizer(cfg.kv_cache, "kv_cache")
    module.__class__ = stacked_class(module, entry.mixin, "Quant")
