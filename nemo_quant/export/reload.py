"""Read exported checkpoints back: dequantized weights, and a calibrated fake-quant model.

The round trip closes the loop on every export: `load_quantized_hf` rebuilds a Megatron model
(at the current TP/PP) whose weights are the checkpoint's dequantized weights and whose
quantizers hold the checkpoint's scales, so its logits equal the model that was exported.
Scales are stored, amaxes are not: each amax is recovered as the value whose scale (computed
by the quantizer's own function) equals the stored one bit for bit.
NVFP4 block scales are recomputed from the data by the quantizer, so NVFP4 weights are held
dequantized (weight quantizer off), which is the same arithmetic.
Only safetensors and JSON are read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from nemo_quant.export.formats import (
    FORMAT_OF_ALGO, INT_BITS, ExportError, ExportFormat, QuantizedLinear, dequantize, unpack_e2m1, unpack_int4_rows,
)
from nemo_quant.export.hf_layout import SPLITS
from nemo_quant.export.validate import QuantBlock, Report, hf_quant_block, is_compressed_tensors
from nemo_quant.export.validate_ct import CTConfig, kv_scale_name
from nemo_quant.models.sources import HFSafetensorsSource
from nemo_quant.numerics.fp8 import fp8_scale
from nemo_quant.numerics.integer import int_scale
from nemo_quant.numerics.minifloat import E4M3
from nemo_quant.numerics.nvfp4 import nvfp4_global_scale
from nemo_quant.quantization.config import LayerOverride, QuantConfig, QuantizerSpec

HF_SUFFIXES = {"weight": "weight", "weight_scale": "weight_scale", "weight_scale_2": "weight_scale_2",
               "input_scale": "input_scale", "pre_quant_scale": "pre_quant_scale"}
TRT_SUFFIXES = {"weight": "weight", "weight_scale": "weights_scaling_factor", "weight_scale_2": "weights_scaling_factor_2",
                "input_scale": "activation_scaling_factor", "pre_quant_scale": "prequant_scaling_factor"}


def unpack_linear(fmt: ExportFormat, group: int, get: Callable[[str], torch.Tensor | None], suffixes: dict) -> QuantizedLinear:
    """A QuantizedLinear from its stored tensors; `get(suffix)` returns None for absent ones."""
    w = get(suffixes["weight"])
    if fmt in (ExportFormat.w4a16_awq, ExportFormat.w4a8_awq):
        w = unpack_int4_rows(w.view(torch.uint8))
    elif fmt == ExportFormat.nvfp4:
        w = unpack_e2m1(w)
    elif fmt == ExportFormat.fp8 and w.dtype == torch.int8:
        w = w.view(torch.float8_e4m3fn)
    if fmt == ExportFormat.none:
        return QuantizedLinear(fmt, w)
    scalar = lambda t: None if t is None else t.float().reshape(())  # noqa: E731
    ws = get(suffixes["weight_scale"])
    if fmt == ExportFormat.fp8:
        ws = scalar(ws)
    pqs = get(suffixes["pre_quant_scale"])
    return QuantizedLinear(fmt, w, group, ws, scalar(get(suffixes["weight_scale_2"])), scalar(get(suffixes["input_scale"])),
                           None if pqs is None else pqs.float())


CT_FORMATS = {"W4A16": ExportFormat.w4a16_awq, "W8A16": ExportFormat.w8a16, "W8A8_INT8": ExportFormat.int8_sq,
              "FP8": ExportFormat.fp8}


def ct_format_of(ct: CTConfig, module: str, path: Path) -> tuple[ExportFormat, int]:
    group = ct.group_of(module)
    if group is None:
        return ExportFormat.none, 0
    algo, size = group.algo
    if algo is None:
        raise ExportError(f"{path}: config group {group.name} of {module} is not a scheme the reader supports "
                          "(W4A16 groups, W8A16 channels, W8A8 INT8 static, FP8 static)")
    return CT_FORMATS[algo], size


def ct_unpack_linear(fmt: ExportFormat, group: int, get: Callable[[str], torch.Tensor | None]) -> QuantizedLinear:
    """A QuantizedLinear from compressed-tensors tensors (see export/compressed_tensors.py)."""
    from nemo_quant.export.compressed_tensors import unpack_int32

    if fmt == ExportFormat.none:
        return QuantizedLinear(fmt, get("weight"))
    if fmt in (ExportFormat.w4a16_awq, ExportFormat.w8a16):
        rows, cols = (int(v) for v in get("weight_shape"))
        codes = unpack_int32(get("weight_packed"), INT_BITS[fmt], cols)
        scale = get("weight_scale").float()
        return QuantizedLinear(fmt, codes, group, scale.reshape(rows) if fmt == ExportFormat.w8a16 else scale)
    scale = get("weight_scale").float()
    scale = scale.reshape(-1) if fmt == ExportFormat.int8_sq else scale.reshape(())
    return QuantizedLinear(fmt, get("weight"), 0, scale, None, get("input_scale").float().reshape(()))


class HFQuantizedCheckpoint:
    """A unified HF checkpoint (ours or another tool's): architecture, formats, dequantized weights."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.source = HFSafetensorsSource(self.path)
        self.arch = self.source.arch
        self._names = set(self.source.names())
        config = json.loads((self.path / "config.json").read_text())
        report = Report()
        self.ct: CTConfig | None = None
        if is_compressed_tensors(config):
            self.ct = CTConfig(config["quantization_config"], report.errors)
            self.quant = QuantBlock({"kv_cache_quant_algo": "FP8" if self.ct.kv else None})
        else:
            self.quant: QuantBlock = hf_quant_block(self.path, config, report)
        if report.errors:
            raise ExportError(f"{self.path}: {'; '.join(report.errors)}")

    def format_of(self, module: str) -> tuple[ExportFormat, int]:
        if self.ct is not None:
            return ct_format_of(self.ct, module, self.path)
        algo, group = self.quant.of(module)
        if algo is None:
            return ExportFormat.none, 0
        if algo not in FORMAT_OF_ALGO:
            raise ExportError(f"{self.path}: quant_algo {algo} of {module} is not supported by the reader")
        return FORMAT_OF_ALGO[algo], group

    def linear(self, module: str) -> QuantizedLinear:
        get = lambda s: self.source.raw(f"{module}.{s}") if f"{module}.{s}" in self._names else None  # noqa: E731
        if self.ct is not None:
            return ct_unpack_linear(*self.format_of(module), get)
        return unpack_linear(*self.format_of(module), get, HF_SUFFIXES)

    def kv_scales(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self.quant.kv:
            return None
        if self.ct is not None:
            names = [kv_scale_name(f"model.layers.{layer}.", r) for r in ("k", "v")]
        else:
            names = [f"model.layers.{layer}.self_attn.{r}_proj.{r}_scale" for r in ("k", "v")]
        return tuple(self.source.raw(n).float().reshape(()) for n in names)


class DequantizedSource:
    """WeightSource over an HF quantized checkpoint: every weight dequantized, HF names."""

    def __init__(self, ckpt: HFQuantizedCheckpoint):
        self.ckpt, self.arch = ckpt, ckpt.arch

    def names(self) -> list[str]:
        return [n for n in self.ckpt.source.names() if n.endswith(".weight")]

    def get(self, name: str) -> torch.Tensor:
        module = name.rsplit(".", 1)[0]
        if module.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            return dequantize(self.ckpt.linear(module), torch.float32)
        return self.ckpt.source.get(name)


# -- the rebuilt fake-quant model ---------------------------------------------------------------
def _specs(fmt: ExportFormat, group: int) -> tuple[QuantizerSpec | None, QuantizerSpec | None]:
    tensor = lambda f: QuantizerSpec(format=f, granularity="tensor")  # noqa: E731
    return {
        ExportFormat.none: (None, None),
        ExportFormat.fp8: (tensor("fp8_e4m3"), tensor("fp8_e4m3")),
        ExportFormat.int8_sq: (QuantizerSpec(format="int8", granularity="channel"), tensor("int8")),
        ExportFormat.w8a16: (QuantizerSpec(format="int8", granularity="channel"), None),
        ExportFormat.w4a16_awq: (QuantizerSpec(format="int4", granularity="block", block_size=group), None),
        ExportFormat.w4a8_awq: (QuantizerSpec(format="int4", granularity="block", block_size=group), tensor("fp8_e4m3")),
        ExportFormat.nvfp4: (None, QuantizerSpec(format="nvfp4", granularity="block")),
    }[fmt]


def rebuilt_quant_config(ckpt: HFQuantizedCheckpoint) -> QuantConfig:
    overrides, formats = [], set()
    for i in range(ckpt.arch.num_layers):
        for name, projs in SPLITS.items():
            fmt, group = ckpt.format_of(f"model.layers.{i}.{projs[0]}")
            formats.add(fmt)
            weight, inp = _specs(fmt, group)
            overrides.append(LayerOverride(pattern=f"decoder.layers.{i}.{name}", weight=weight, input=inp))
    smoothed = formats & {ExportFormat.int8_sq, ExportFormat.w4a16_awq, ExportFormat.w4a8_awq}
    if smoothed and ExportFormat.nvfp4 in formats:
        raise ExportError(f"{ckpt.path}: NVFP4 mixed with pre-quant-scaled formats cannot be rebuilt in one quant config")
    algorithm = "smoothquant" if ExportFormat.int8_sq in formats else "awq_lite" if smoothed else "max"
    kv = QuantizerSpec(format="fp8_e4m3", granularity="tensor") if ckpt.quant.kv else None
    return QuantConfig(name=f"reloaded:{ckpt.quant.algo}", algorithm=algorithm, overrides=overrides, kv_cache=kv)


def amax_for_scale(scale: torch.Tensor, qmax: float, scale_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The amax whose scale, computed by `scale_fn`, equals `scale` exactly (amax = scale * qmax,
    moved by a few ulps where the product and the division do not round-trip)."""
    scale = scale.float()
    amax = scale * qmax
    for _ in range(8):
        got = scale_fn(amax)
        wrong = got != scale
        if not wrong.any():
            return amax
        amax = torch.where(wrong, torch.nextafter(amax, torch.where(got < scale, torch.inf, -torch.inf)), amax)
    raise ExportError("a stored scale has no amax that reproduces it (corrupt scale tensor?)")


def _weight_amax(ql: QuantizedLinear) -> torch.Tensor | None:
    if ql.fmt == ExportFormat.fp8:
        return amax_for_scale(ql.weight_scale, E4M3.max_value, lambda a: fp8_scale(a, E4M3))
    if ql.fmt in INT_BITS:
        bits = INT_BITS[ql.fmt]
        amax = amax_for_scale(ql.weight_scale, 2 ** (bits - 1) - 1, lambda a: int_scale(a, bits))
        return amax.reshape(-1, 1) if amax.ndim == 1 else amax
    return None


def _input_amax(ql: QuantizedLinear) -> torch.Tensor | None:
    if ql.input_scale is None:
        return None
    if ql.fmt == ExportFormat.int8_sq:
        return amax_for_scale(ql.input_scale, 127, lambda a: int_scale(a, 8))
    if ql.fmt == ExportFormat.nvfp4:
        return amax_for_scale(ql.input_scale, 6 * E4M3.max_value, nvfp4_global_scale)
    return amax_for_scale(ql.input_scale, E4M3.max_value, lambda a: fp8_scale(a, E4M3))


def restore_scales(model, ckpt: HFQuantizedCheckpoint) -> None:
    """Set this rank's quantizer amaxes and pre-quant scales from the checkpoint."""
    from megatron.core import parallel_state as ps

    from nemo_quant.models.megatron_layout import interleave_qkv, rows

    tp, r, arch = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank(), ckpt.arch
    for layer in model.decoder.layers:
        i = layer.layer_number - 1
        for name, projs in SPLITS.items():
            module = layer.get_submodule(name)
            parts = [ckpt.linear(f"model.layers.{i}.{p}") for p in projs]
            wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
            amaxes = [_weight_amax(p) for p in parts]
            if wq is not None:
                if amaxes[0].ndim == 0:
                    amax = amaxes[0]
                elif name.endswith("linear_qkv"):
                    amax = interleave_qkv(*amaxes, arch, r, tp)
                elif name.endswith("linear_fc1"):
                    amax = torch.cat([rows(a, r, tp) for a in amaxes])
                else:
                    amax = amaxes[0]  # row parallel: per-row and global-block amaxes are replicated
                wq.set_amax(amax)
            if iq is not None:
                iq.set_amax(_input_amax(parts[0]))
            pqs = parts[0].pre_quant_scale
            if getattr(module, "pre_quant_scale", None) is not None and pqs is not None:
                if len(projs) > 1 and not torch.all(pqs == 1):
                    raise ExportError(f"{ckpt.path}: model.layers.{i}.{projs[0]} has an unfolded pre_quant_scale")
                with torch.no_grad():
                    module.pre_quant_scale.copy_(pqs.chunk(tp)[r] if module._nq_weight_tp_axis == 1 else pqs)
        kv = ckpt.kv_scales(i)
        if kv is not None:
            attention = layer.self_attention.core_attention
            for quantizer, scale in zip((attention.k_quantizer, attention.v_quantizer), kv):
                quantizer.set_amax(amax_for_scale(scale, E4M3.max_value, lambda a: fp8_scale(a, E4M3)))


def load_quantized_hf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(model, arch): this rank's shard of a calibrated fake-quant model rebuilt from an HF
    quantized checkpoint; Megatron parallel state must be initialised."""
    from nemo_quant.models.builder import build_gpt_model
    from nemo_quant.models.importer import import_weights
    from nemo_quant.modes import apply_modes

    ckpt = HFQuantizedCheckpoint(path)
    model = build_gpt_model(ckpt.arch, dtype)
    import_weights(model, DequantizedSource(ckpt))
    apply_modes(model, [("quantize", rebuilt_quant_config(ckpt))])
    restore_scales(model, ckpt)
    return model, ckpt.arch
