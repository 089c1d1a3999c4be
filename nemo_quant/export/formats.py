"""Deployable formats: which quantizer specs map to which checkpoint format, and the
quantized tensors of one linear layer in that format (unpacked, split-able by TP rules).

Scale convention of both checkpoint formats: a *dequant* scale, x = q * s. Every tensor here
is computed with the same functions the fake quantizer uses (`numerics/`), so dequantizing
an export reproduces the fake-quant weights bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import torch

from nemo_quant.numerics.blocks import from_blocks, to_blocks
from nemo_quant.numerics.fp8 import fp8_scale
from nemo_quant.numerics.integer import int_quantize, int_scale
from nemo_quant.numerics.minifloat import E4M3
from nemo_quant.numerics.nvfp4 import nvfp4_global_scale, nvfp4_quantize
from nemo_quant.quantization.config import Granularity, QFormat, QuantizerSpec


class ExportError(ValueError):
    """The model (or the export config) cannot be written in the requested format."""


class ExportFormat(str, Enum):
    none = "none"
    fp8 = "fp8"
    int8_sq = "int8_sq"
    w8a16 = "w8a16"
    w4a16_awq = "w4a16_awq"
    w4a8_awq = "w4a8_awq"
    nvfp4 = "nvfp4"


# QuantAlgo strings of TensorRT-LLM / ModelOpt (hf_quant_config.json, TRT-LLM config.json).
QUANT_ALGO = {
    ExportFormat.none: None, ExportFormat.fp8: "FP8", ExportFormat.int8_sq: "W8A8_SQ_PER_CHANNEL",
    ExportFormat.w8a16: "W8A16", ExportFormat.w4a16_awq: "W4A16_AWQ", ExportFormat.w4a8_awq: "W4A8_AWQ",
    ExportFormat.nvfp4: "NVFP4",
}
FORMAT_OF_ALGO = {algo: fmt for fmt, algo in QUANT_ALGO.items() if algo}
GROUPED = {ExportFormat.w4a16_awq, ExportFormat.w4a8_awq, ExportFormat.nvfp4}
INT_BITS = {ExportFormat.int8_sq: 8, ExportFormat.w8a16: 8, ExportFormat.w4a16_awq: 4, ExportFormat.w4a8_awq: 4}
# Formats whose layers take a `pre_quant_scale` (SmoothQuant smoother / AWQ scale).
SMOOTHED = {ExportFormat.int8_sq, ExportFormat.w4a16_awq, ExportFormat.w4a8_awq}
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])

_SUPPORTED = (
    "fp8 (fp8_e4m3 tensor weights + fp8_e4m3 tensor inputs), int8_sq (int8 channel weights + int8 tensor inputs), "
    "int8_weight_only (int8 channel weights), int4_awq (int4 block weights), w4a8_awq (int4 block weights + "
    "fp8_e4m3 tensor inputs), nvfp4 (nvfp4 weights + nvfp4 inputs)"
)


def _is(spec: QuantizerSpec | None, fmt: QFormat, gran: Granularity | None = None) -> bool:
    return spec is not None and QFormat(spec.format) == fmt and (gran is None or Granularity(spec.granularity) == gran)


def export_format(weight: QuantizerSpec | None, input: QuantizerSpec | None, where: str) -> tuple[ExportFormat, int]:
    """(format, group size or 0) of a linear layer quantized with these specs."""
    if weight is None and input is None:
        return ExportFormat.none, 0
    t, c, b = Granularity.tensor, Granularity.channel, Granularity.block
    if _is(weight, QFormat.fp8_e4m3, t) and _is(input, QFormat.fp8_e4m3, t):
        return ExportFormat.fp8, 0
    if _is(weight, QFormat.int8, c) and _is(input, QFormat.int8, t):
        return ExportFormat.int8_sq, 0
    if _is(weight, QFormat.int8, c) and input is None:
        return ExportFormat.w8a16, 0
    if _is(weight, QFormat.int4, b) and input is None:
        return ExportFormat.w4a16_awq, weight.effective_block_size()
    if _is(weight, QFormat.int4, b) and _is(input, QFormat.fp8_e4m3, t):
        return ExportFormat.w4a8_awq, weight.effective_block_size()
    if _is(weight, QFormat.nvfp4) and _is(input, QFormat.nvfp4):
        if weight.effective_block_size() != 16 or input.effective_block_size() != 16:
            raise ExportError(f"{where}: NVFP4 checkpoints use blocks of 16; set quant.weight.block_size and "
                              "quant.input.block_size to 0 (the format's default).")
        return ExportFormat.nvfp4, 16
    describe = lambda s: "none" if s is None else f"{QFormat(s.format).value}/{Granularity(s.granularity).value}"  # noqa: E731
    raise ExportError(
        f"{where}: quant.weight={describe(weight)} with quant.input={describe(input)} has no deployable checkpoint "
        f"format. Exportable combinations: {_SUPPORTED}. Pick one of those presets (quant=fp8, quant=int8_sq, ...) "
        "or keep the model for fake-quant evaluation only."
    )


@dataclass
class QuantizedLinear:
    """One linear layer in its checkpoint format, unpacked (codes one per element).

    weight: float (none), float8_e4m3fn (fp8), int8 codes (int formats) or uint8 E2M1 codes
    0..15 (nvfp4, bit 3 = sign). weight_scale: fp32 0-d (fp8), [out] (per channel),
    [out, in/G] (int blocks) or float8 [out, in/16] (nvfp4). weight_scale_2 / input_scale:
    fp32 0-d. pre_quant_scale: fp32 [in]."""

    fmt: ExportFormat
    weight: torch.Tensor
    group_size: int = 0
    weight_scale: torch.Tensor | None = None
    weight_scale_2: torch.Tensor | None = None
    input_scale: torch.Tensor | None = None
    pre_quant_scale: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def take_rows(self, index: torch.Tensor | slice) -> "QuantizedLinear":
        """Output rows `index` (a slice or indices): a column-parallel shard or one of fused rows."""
        ws = self.weight_scale
        if ws is not None and ws.ndim >= 1:
            ws = ws[index]
        return replace(self, weight=self.weight[index], weight_scale=ws)

    def cols(self, start: int, stop: int) -> "QuantizedLinear":
        """Input columns [start, stop): a row-parallel shard. Block scales follow their blocks."""
        ws = self.weight_scale
        if ws is not None and ws.ndim == 2:
            g = self.group_size
            if start % g or (stop - start) % g:
                raise ExportError(f"the input split [{start}, {stop}) cuts a block of {g}; choose an "
                                  "export.inference_tp whose per-rank input dim is a multiple of the group size.")
            ws = ws[:, start // g:stop // g]
        pqs = self.pre_quant_scale[start:stop] if self.pre_quant_scale is not None else None
        return replace(self, weight=self.weight[:, start:stop], weight_scale=ws, pre_quant_scale=pqs)


def cat_rows(parts: list[QuantizedLinear]) -> QuantizedLinear:
    """Fuse layers that read the same input (q/k/v): rows concatenated, shared scalars kept."""
    first = parts[0]
    for p in parts[1:]:
        for name in ("weight_scale_2", "input_scale", "pre_quant_scale"):
            a, b = getattr(first, name), getattr(p, name)
            if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
                raise ExportError(f"fused rows disagree on {name}; they must share one input quantizer")
    ws = first.weight_scale
    if ws is not None and ws.ndim >= 1:
        ws = torch.cat([p.weight_scale for p in parts])
    elif ws is not None and any(not torch.equal(p.weight_scale, ws) for p in parts):
        raise ExportError("fused rows have different per-tensor weight scales")
    return replace(first, weight=torch.cat([p.weight for p in parts]), weight_scale=ws)


# 2|v| of the grid values is 0, 1, 2, 3, 4, 6, 8, 12: a table from 2|v| to the code index.
_E2M1_INDEX_OF_DOUBLE = torch.tensor([0, 1, 2, 3, 4, 0, 5, 0, 6, 0, 0, 0, 7], dtype=torch.uint8)


def e2m1_codes(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values (exactly on the grid, as the quantizer rounds them) -> 4-bit codes, bit 3 the sign."""
    index = _E2M1_INDEX_OF_DOUBLE.to(values.device)[(values.abs() * 2).long()]
    return index | (torch.signbit(values).to(torch.uint8) << 3)


def e2m1_values(codes: torch.Tensor) -> torch.Tensor:
    mag = E2M1_VALUES.to(codes.device)[(codes & 7).long()]
    return torch.where((codes & 8) > 0, -mag, mag)


def quantize_linear(fmt: ExportFormat, weight: torch.Tensor, weight_amax: torch.Tensor | None,
                    input_amax: torch.Tensor | None, pre_quant_scale: torch.Tensor | None,
                    group_size: int = 0) -> QuantizedLinear:
    """The checkpoint tensors of a (TP-gathered) linear layer from its stored weight and amaxes."""
    w = weight.detach()
    pqs = pre_quant_scale.float() if pre_quant_scale is not None else None
    if fmt == ExportFormat.none:
        return QuantizedLinear(fmt, w)
    if fmt == ExportFormat.fp8:
        scale = fp8_scale(weight_amax.reshape(()), E4M3)
        q = (w.float() / scale).clamp(-E4M3.max_value, E4M3.max_value).to(torch.float8_e4m3fn)
        return QuantizedLinear(fmt, q, 0, scale, None, fp8_scale(input_amax.reshape(()), E4M3), pqs)
    if fmt in INT_BITS:
        bits = INT_BITS[fmt]
        if fmt in (ExportFormat.int8_sq, ExportFormat.w8a16):
            codes, scale = int_quantize(w, weight_amax.reshape(-1, 1), bits)
            ws = scale.reshape(-1)
        else:
            codes, scale = int_quantize(to_blocks(w, group_size), weight_amax.unsqueeze(-1), bits)
            codes, ws = from_blocks(codes, w.shape[-1]), scale.squeeze(-1)
        inp = None
        if fmt == ExportFormat.int8_sq:
            inp = int_scale(input_amax.reshape(()), 8)
        elif fmt == ExportFormat.w4a8_awq:
            inp = fp8_scale(input_amax.reshape(()), E4M3)
        # W4A8: the GEMM runs in FP8; the per-tensor stage keeps max|q * ws / ws2| within E4M3.
        ws2 = fp8_scale(weight_amax.amax(), E4M3) if fmt == ExportFormat.w4a8_awq else None
        return QuantizedLinear(fmt, codes.to(torch.int8), group_size, ws, ws2, inp, pqs)
    if fmt == ExportFormat.nvfp4:
        amax = weight_amax.reshape(())
        q, s, g = nvfp4_quantize(w, amax, 16)
        codes = from_blocks(e2m1_codes(q), w.shape[-1])
        block_scale = s.squeeze(-1).to(torch.float8_e4m3fn)
        return QuantizedLinear(fmt, codes, 16, block_scale, g, nvfp4_global_scale(input_amax.reshape(())), pqs)
    raise ExportError(f"unknown export format {fmt}")


def dequantize(ql: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """The float weight a consumer computes with, in the operation order of the fake quantizer."""
    fmt = ql.fmt
    if fmt == ExportFormat.none:
        return ql.weight.to(dtype)
    if fmt == ExportFormat.fp8:
        return (ql.weight.float() * ql.weight_scale).to(dtype)
    if fmt in (ExportFormat.int8_sq, ExportFormat.w8a16):
        return (ql.weight.float() * ql.weight_scale.reshape(-1, 1)).to(dtype)
    if fmt in INT_BITS:
        blocks = to_blocks(ql.weight.float(), ql.group_size) * ql.weight_scale.unsqueeze(-1)
        return from_blocks(blocks, ql.weight.shape[-1]).to(dtype)
    if fmt == ExportFormat.nvfp4:
        values = to_blocks(e2m1_values(ql.weight), 16)
        return from_blocks(values * ql.weight_scale.float().unsqueeze(-1) * ql.weight_scale_2, ql.weight.shape[-1]).to(dtype)
    raise ExportError(f"unknown export format {fmt}")


# -- packing -------------------------------------------------------------------------------
def pack_int4_rows(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [out, in] in [-8, 7] -> uint8 [out/2, in]: byte = row 2j (low nibble) | row 2j+1 (high)."""
    if codes.shape[0] % 2:
        raise ExportError(f"INT4 packing pairs output rows; {codes.shape[0]} rows is odd.")
    return ((codes[0::2] & 0xF) | ((codes[1::2] & 0xF) << 4)).to(torch.uint8)


def unpack_int4_rows(packed: torch.Tensor) -> torch.Tensor:
    p = packed.to(torch.int16)
    low, high = p & 0xF, (p >> 4) & 0xF
    low, high = torch.where(low > 7, low - 16, low), torch.where(high > 7, high - 16, high)
    return torch.stack([low, high], dim=1).reshape(-1, packed.shape[1]).to(torch.int8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [out, in] -> uint8 [out, in/2]: byte = element 2j (low nibble) | element 2j+1 (high)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).to(torch.uint8)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
