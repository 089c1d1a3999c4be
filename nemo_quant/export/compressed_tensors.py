"""compressed-tensors checkpoint: the format llm-compressor writes and vLLM loads natively.

Same directory as the unified HF checkpoint (HF Llama names, embeddings, norms, tokenizer),
with each quantized linear stored as compressed-tensors stores it and a
`quantization_config` of `quant_method: compressed-tensors` in config.json:
- W4A16 / W8A16 (INT4 blocks, INT8 channels; AWQ/GPTQ/RTN weights): `pack-quantized`,
  `weight_packed` int32 [out, in * bits / 32] (consecutive input columns in one word, the
  first in the lowest bits, each code offset by 2^(bits-1) to unsigned), `weight_scale`
  [out, in / group] (or [out, 1]), `weight_shape` int64 [2].
- W8A8 INT8 (SmoothQuant): `int-quantized`, int8 `weight`, `weight_scale` [out, 1], static
  per-tensor `input_scale` [1].
- FP8: `float-quantized`, float8_e4m3fn `weight`, `weight_scale` [1], `input_scale` [1].
- FP8 KV cache: `kv_cache_scheme` and `self_attn.{k,v}_scale` [1].
Scales are dequant scales (x = q * s) stored in float32, so the checkpoint dequantizes to the
fake-quant weights bit for bit; consumers cast them to their compute dtype. One config group
per (format, group size), targeting `Linear` when the model has one format, else the module
names of its layers; unquantized layers (and lm_head) are listed in `ignore`.
Smoothing scales have no place here: o_proj / down_proj scales must be folded into the layers
before them (quant.search.fold_all_scales), q/k/v and gate/up scales into the norms.
"""
from __future__ import annotations

import torch

from nemo_quant.export.formats import ExportError, ExportFormat, QuantizedLinear
from nemo_quant.export.hf import HFWriter
from nemo_quant.export.quant_summary import QuantSummary

CT_VERSION = "0.17.0"  # the compressed-tensors release whose layout this writes (tested against it)
PACKED, INT, FLOAT = "pack-quantized", "int-quantized", "float-quantized"


def _args(num_bits: int, kind: str, strategy: str, group_size: int | None = None) -> dict:
    """A QuantizationArgs dict (symmetric, static: every scale is in the checkpoint)."""
    return {"num_bits": num_bits, "type": kind, "symmetric": True, "group_size": group_size, "strategy": strategy,
            "block_structure": None, "dynamic": False, "actorder": None, "scale_dtype": None, "zp_dtype": None,
            "observer": "minmax", "observer_kwargs": {}}


def ct_scheme(fmt: ExportFormat, group: int, where: str = "model") -> dict:
    """The config-group body (format, weights, input_activations) of a layer in `fmt`."""
    if fmt == ExportFormat.w4a16_awq:
        return {"format": PACKED, "weights": _args(4, "int", "group", group), "input_activations": None}
    if fmt == ExportFormat.w8a16:
        return {"format": PACKED, "weights": _args(8, "int", "channel"), "input_activations": None}
    if fmt == ExportFormat.int8_sq:
        return {"format": INT, "weights": _args(8, "int", "channel"), "input_activations": _args(8, "int", "tensor")}
    if fmt == ExportFormat.fp8:
        return {"format": FLOAT, "weights": _args(8, "float", "tensor"), "input_activations": _args(8, "float", "tensor")}
    raise ExportError(f"{where}: {fmt.value} has no compressed-tensors layout here (exported: int4 blocks W4A16, "
                      "int8 weight-only W8A16, int8 SmoothQuant W8A8, fp8); write it with export.format=hf.")


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [out, in] in [-2^(bits-1), 2^(bits-1)) -> int32 [out, in * bits / 32]."""
    per_word = 32 // bits
    rows, cols = codes.shape
    if cols % per_word:
        raise ExportError(f"{bits}-bit packing needs an input dim divisible by {per_word} (got {cols}).")
    unsigned = (codes.to(torch.int64) + (1 << (bits - 1))).reshape(rows, cols // per_word, per_word)
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    words = (unsigned << shifts).sum(dim=-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)  # two's complement view of uint32


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    per_word = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64) * bits
    unsigned = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return (unsigned.reshape(packed.shape[0], -1)[:, :cols] - (1 << (bits - 1))).to(torch.int8)


def ct_linear_tensors(ql: QuantizedLinear, dtype: torch.dtype, where: str) -> dict[str, torch.Tensor]:
    f = ql.fmt
    if f == ExportFormat.none:
        return {"weight": ql.weight.to(dtype)}
    # A smoothing scale left on the layer was refused by the export preflight (writer.check_compressed_tensors).
    out, rows = ct_scheme(f, ql.group_size, where), ql.weight.shape[0]
    if out["format"] == PACKED:
        bits = out["weights"]["num_bits"]
        return {"weight_packed": pack_int32(ql.weight, bits), "weight_scale": ql.weight_scale.reshape(rows, -1).float(),
                "weight_shape": torch.tensor(list(ql.weight.shape), dtype=torch.int64)}
    scale = ql.weight_scale.reshape(rows, 1) if f == ExportFormat.int8_sq else ql.weight_scale.reshape(1)
    return {"weight": ql.weight, "weight_scale": scale.float(), "input_scale": ql.input_scale.reshape(1).float()}


def ct_quantization_config(summary: QuantSummary) -> dict | None:
    """config.json's `quantization_config`, or None for an unquantized model."""
    kinds = sorted(summary.kinds, key=lambda k: (k[0].value, k[1]))
    kv = summary.kv_cache_quant_algo is not None
    if not kinds and not kv:
        return None
    groups = {}
    for i, (fmt, group) in enumerate(kinds):
        body = ct_scheme(fmt, group)
        targets = ["Linear"] if len(kinds) == 1 else [n for n, k in summary.modules.items() if k == (fmt, group)]
        groups[f"group_{i}"] = {"targets": targets, **body, "output_activations": None}
    formats = {g["format"] for g in groups.values()}
    ignore = ["lm_head", *[n for n, (f, _) in summary.modules.items() if f == ExportFormat.none]]
    return {
        "quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": groups, "ignore": ignore,
        "kv_cache_scheme": _args(8, "float", "tensor") if kv else None,
        "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}, "version": CT_VERSION,
    }


class CompressedTensorsWriter(HFWriter):
    """The HF writer with compressed-tensors linears, KV-cache scale names and config block."""

    KV_SCALE_NAMES, KV_SCALE_SHAPE = ("self_attn.k_scale", "self_attn.v_scale"), (1,)

    def linear_tensors(self, ql: QuantizedLinear, proj: str, where: str) -> dict[str, torch.Tensor]:
        return ct_linear_tensors(ql, self.dtype, where)

    def quantization_blocks(self, summary: QuantSummary, producer: dict) -> tuple[dict | None, dict | None]:
        return ct_quantization_config(summary), None
