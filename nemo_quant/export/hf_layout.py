"""A gathered Megatron decoder layer in Hugging Face Llama terms: q/k/v, o, gate/up, down.

Fused Megatron linears are quantized once (their scales are shared by construction) and
then split by rows, so q/k/v and gate/up carry exactly the rows and scales of the fused
tensor: linear_qkv rows are per query group [q heads, k, v] (see models/megatron_layout.py),
linear_fc1 rows are [gate; up].
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nemo_quant.export.formats import (
    GROUPED, SMOOTHED, ExportError, ExportFormat, QuantizedLinear, export_format, quantize_linear,
)
from nemo_quant.export.gather import LayerPiece
from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.megatron_layout import split_qkv
from nemo_quant.numerics.fp8 import fp8_scale
from nemo_quant.numerics.minifloat import E4M3
from nemo_quant.quantization.config import Granularity, QFormat

ATTN, MLP = "self_attention.", "mlp."
# HF projections of each Megatron linear, in row order of the fused tensor.
SPLITS = {
    "self_attention.linear_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attention.linear_proj": ("self_attn.o_proj",),
    "mlp.linear_fc1": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.linear_fc2": ("mlp.down_proj",),
}
NORMS = {"input_layernorm.weight": "input_layernorm.weight", "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
HF_PROJS = [p for projs in SPLITS.values() for p in projs]


@dataclass
class HFLayer:
    index: int
    norms: dict[str, torch.Tensor]
    linears: dict[str, QuantizedLinear]  # keyed by "self_attn.q_proj", ...
    kv_scales: tuple[torch.Tensor, torch.Tensor] | None = None  # FP8 K and V dequant scales (0-d)
    group_sizes: dict[str, int] = field(default_factory=dict)
    sparse_projs: list[str] = field(default_factory=list)  # projections under a sparsity mask

    def format_of(self, proj: str) -> ExportFormat:
        return self.linears[proj].fmt


def _row_groups(megatron_name: str, rows: int, arch: LlamaArch) -> list[torch.Tensor | slice]:
    if megatron_name.endswith("linear_qkv"):
        return list(split_qkv(torch.arange(rows), arch))
    if megatron_name.endswith("linear_fc1"):
        return [slice(0, rows // 2), slice(rows // 2, rows)]
    return [slice(0, rows)]


def linear_format(specs, in_features: int, where: str) -> tuple[ExportFormat, int]:
    """Export format of a linear layer, with the packing constraints on its (global) input dim."""
    fmt, group = export_format(*specs, where)
    if fmt == ExportFormat.nvfp4 and in_features % 16:
        raise ExportError(f"{where}: NVFP4 packing needs an input dim divisible by 16 (got {in_features}).")
    if fmt in GROUPED and in_features % group:
        raise ExportError(
            f"{where}: input dim {in_features} is not a multiple of quant.weight.block_size={group}; checkpoint "
            "formats have no ragged groups. Quantize with a block size that divides every input dim "
            "(e.g. quant.weight.block_size=64 for SmolLM2's 576)."
        )
    return fmt, group


def check_pre_quant_scale(fmt: ExportFormat, pqs: torch.Tensor | None, fused: bool, where: str,
                          planned: bool = False) -> None:
    """Loaders read a pre-quant scale only where the format has one, and never on fused q/k/v, gate/up.
    `planned`: a smoothing algorithm is configured and will write one (checked before calibration)."""
    if not planned and (pqs is None or torch.all(pqs == 1)):
        return
    if fmt not in SMOOTHED:
        raise ExportError(f"{where}: a pre-quant scale is set but {fmt.value} checkpoints have no place for it; "
                          "use quant.algorithm=max with this format, or export.format=null.")
    if fused:
        raise ExportError(f"{where}: its pre-quant scale is not folded into the preceding norm; the fused "
                          "q/k/v and gate/up loaders of TensorRT-LLM ignore it.")


def check_kv_spec(spec, where: str) -> None:
    if QFormat(spec.format) != QFormat.fp8_e4m3 or Granularity(spec.granularity) != Granularity.tensor:
        raise ExportError(f"{where}: quant.kv_cache={QFormat(spec.format).value}/{Granularity(spec.granularity).value} "
                          "cannot be exported; checkpoints carry FP8 (E4M3) per-tensor KV-cache scales only.")


def check_masked_zeros(weight: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    """Pruned weights must be exactly zero: the deployed model has no mask, only the zeros."""
    from nemo_quant.sparsity.patterns import revived_weights

    bad = revived_weights(weight, mask)
    if bad:
        raise ExportError(f"{where}: {bad} weights are nonzero where its sparsity mask is 0 (the checkpoint's weights "
                          "violate its masks: was it edited, or trained outside nemo_quant?); re-run sparsify or "
                          "fix the weights.")


def convert_layer(piece: LayerPiece, arch: LlamaArch) -> HFLayer:
    t = piece.tensors
    where = f"decoder.layers.{piece.index}"
    linears, groups, sparse = {}, {}, []
    for name, projs in SPLITS.items():
        weight = t[f"{name}.weight"]
        mask = t.get(f"{name}.sparse_mask")
        if mask is not None:
            check_masked_zeros(weight, mask, f"{where}.{name}")
        fmt, group = linear_format(piece.specs.get(name, (None, None)), weight.shape[1], f"{where}.{name}")
        pqs = t.get(f"{name}.pre_quant_scale")
        check_pre_quant_scale(fmt, pqs, len(projs) > 1, f"{where}.{name}")
        if fmt not in SMOOTHED:
            pqs = None
        elif pqs is None:
            pqs = torch.ones(weight.shape[1])
        fused = quantize_linear(fmt, weight, t.get(f"{name}.weight_quantizer._amax"),
                                t.get(f"{name}.input_quantizer._amax"), pqs, group)
        for proj, index in zip(projs, _row_groups(name, fused.out_features, arch)):
            linears[proj] = fused.take_rows(index)
            groups[proj] = group
        sparse += list(projs) if mask is not None else []
    kv = None
    if piece.kv_spec is not None:
        check_kv_spec(piece.kv_spec, where)
        kv = tuple(fp8_scale(t[f"self_attention.core_attention.{r}_quantizer._amax"].reshape(()), E4M3)
                   for r in ("k", "v"))
    norms = {hf: t[mg] for mg, hf in NORMS.items()}
    return HFLayer(piece.index, norms, linears, kv, groups, sparse)
