"""Checks of a compressed-tensors checkpoint (ours or llm-compressor's) against what vLLM reads:
the `quantization_config` block, which config group owns each linear, and each linear's
tensors (names, dtypes, shapes, packing). Pure Python over the safetensors headers, written
apart from our writer (compressed_tensors.py) so that the two do not share a bug.

Group ownership follows vLLM's compressed-tensors loader: a module listed in `ignore` (exact
name or `re:` regex) is unquantized; otherwise a target naming the module (exact or `re:`)
wins over a class-name target such as `Linear`, and the first group in file order wins a tie.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from nemo_quant.export.validate import HF_PROJS, SCALAR, Report, _compare, read_hf_directory

SUPPORTED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
FLOAT_DTYPES = {"F32", "BF16", "F16"}


@dataclass(frozen=True)
class CTGroup:
    name: str
    targets: tuple[str, ...]
    format: str
    weights: dict | None
    inputs: dict | None

    @property
    def algo(self) -> tuple[str | None, int]:
        """(our format name, group size) for the schemes we read: W4A16, W8A16, W8A8 INT8, FP8."""
        w, x = self.weights or {}, self.inputs
        bits, kind, strategy = w.get("num_bits"), w.get("type"), w.get("strategy")
        static = x is not None and not x.get("dynamic") and x.get("strategy") == "tensor"
        if kind == "int" and x is None and self.format == "pack-quantized":
            if bits == 4 and strategy == "group":
                return "W4A16", int(w.get("group_size") or 0)
            if bits == 8 and strategy == "channel":
                return "W8A16", 0
        if kind == "int" and bits == 8 and strategy == "channel" and static and x.get("type") == "int" \
                and x.get("num_bits") == 8:
            return "W8A8_INT8", 0
        if kind == "float" and bits == 8 and strategy == "tensor" and static and x.get("type") == "float":
            return "FP8", 0
        return None, 0


def _matches(name: str, target: str) -> bool:
    return bool(re.match(target[3:], name)) if target.startswith("re:") else name == target


class CTConfig:
    """A parsed `quantization_config` of `quant_method: compressed-tensors`."""

    def __init__(self, qc: dict, errors: list[str]):
        self.ignore: list[str] = list(qc.get("ignore") or [])
        self.kv = qc.get("kv_cache_scheme")
        top = qc.get("format")
        self.groups: list[CTGroup] = []
        for name, g in (qc.get("config_groups") or {}).items():
            fmt = g.get("format") or top
            if fmt not in SUPPORTED_FORMATS:
                errors.append(f"config_groups.{name}: format {fmt!r} is not one of {', '.join(SUPPORTED_FORMATS)}")
            for role in ("weights", "input_activations"):
                args = g.get(role)
                if args is not None and not args.get("symmetric", True):
                    errors.append(f"config_groups.{name}.{role}: asymmetric quantization (zero points) is not read here")
            self.groups.append(CTGroup(name, tuple(g.get("targets") or []), fmt, g.get("weights"), g.get("input_activations")))
        if not self.groups and self.kv is None:
            errors.append("quantization_config has no config_groups and no kv_cache_scheme")
        if self.kv is not None and (self.kv.get("type"), self.kv.get("num_bits")) != ("float", 8):
            errors.append(f"kv_cache_scheme {self.kv}: only FP8 (type float, 8 bits) KV-cache scales are read here")

    def group_of(self, module: str) -> CTGroup | None:
        """The config group a Linear named `module` belongs to (None: unquantized)."""
        if any(_matches(module, t) for t in self.ignore):
            return None
        for g in self.groups:  # a target that names the module beats a class-name target
            if any(_matches(module, t) for t in g.targets):
                return g
        return next((g for g in self.groups if "Linear" in g.targets), None)


def ct_linear_expect(group: CTGroup | None, out: int, inp: int, dtype: str, where: str, errors: list[str]) -> dict:
    """suffix -> (allowed dtypes, allowed shapes, required) of one linear in `group`."""
    if group is None:
        return {"weight": ({dtype}, [[out, inp]], True)}
    algo, size = group.algo
    if algo is None:
        errors.append(f"{where}: config group {group.name} ({group.format}, weights {group.weights}, inputs "
                      f"{group.inputs}) is not a scheme this reader knows (W4A16, W8A16, W8A8 INT8, FP8)")
        return {}
    if algo in ("W4A16", "W8A16"):
        bits = 4 if algo == "W4A16" else 8
        if algo == "W4A16" and (size <= 0 or inp % size):
            errors.append(f"{where}: input dim {inp} is not a multiple of group_size {size}")
            return {}
        if inp * bits % 32:
            errors.append(f"{where}: {bits}-bit packing needs an input dim divisible by {32 // bits}")
        scales = [[out, inp // size]] if algo == "W4A16" else [[out, 1]]
        return {"weight_packed": ({"I32"}, [[out, inp * bits // 32]], True),
                "weight_scale": (FLOAT_DTYPES, scales, True), "weight_shape": ({"I64", "I32"}, [[2]], True)}
    if algo == "W8A8_INT8":
        return {"weight": ({"I8"}, [[out, inp]], True), "weight_scale": (FLOAT_DTYPES, [[out, 1]], True),
                "input_scale": (FLOAT_DTYPES, SCALAR, True)}
    return {"weight": ({"F8_E4M3"}, [[out, inp]], True), "weight_scale": (FLOAT_DTYPES, SCALAR, True),
            "input_scale": (FLOAT_DTYPES, SCALAR, True)}


def kv_scale_name(prefix: str, role: str) -> str:
    """vLLM maps `self_attn.{k,v}_scale` onto its attention (not llm-compressor's old `k_proj.output_scale`)."""
    return f"{prefix}self_attn.{role}_scale"


def validate_compressed_tensors(directory: Path, config: dict, report: Report) -> None:
    qc = config["quantization_config"]
    ct = CTConfig(qc, report.errors)
    checked = read_hf_directory(directory, config, report)
    if checked is None:
        return
    a, dtype, header, expected = checked
    for i in range(a.layers):
        p = f"model.layers.{i}."
        owners = {}
        for proj, dims in HF_PROJS.items():
            owners[proj] = group = ct.group_of(p + proj)
            for suffix, e in ct_linear_expect(group, *dims(a), dtype, p + proj, report.errors).items():
                expected[f"{p}{proj}.{suffix}"] = e
        for fused in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            if len({owners[f] and owners[f].name for f in fused}) > 1:
                report.errors.append(f"{p}{'/'.join(fused)}: vLLM fuses these and needs one scheme for all of them")
        if ct.kv is not None:
            for role in ("k", "v"):
                expected[kv_scale_name(p, role)] = (FLOAT_DTYPES, SCALAR, True)
    _compare(expected, header, "model", report)
