"""`nemo-quant validate` for QLoRA exports: a bitsandbytes-NF4 HF checkpoint and a PEFT adapter
directory, checked from the safetensors headers and the JSON files alone (like validate.py),
against the shapes the model's config implies."""
from __future__ import annotations

import json
from pathlib import Path

from nemo_quant.export.validate import (
    HF_PROJS, Report, _check_file_layout, _compare, _hf_arch, _require, read_header, read_hf_directory,
)

NF4_KEYS = {"bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "load_in_4bit": True}


def is_bnb_nf4(config: dict) -> bool:
    return (config.get("quantization_config") or {}).get("quant_method") == "bitsandbytes"


def validate_bnb_nf4(directory: Path, config: dict, report: Report) -> None:
    quant = config["quantization_config"]
    for key, want in NF4_KEYS.items():
        if quant.get(key) != want:
            report.errors.append(f"config.json quantization_config.{key}={quant.get(key)!r}, expected {want!r}")
    checked = read_hf_directory(directory, config, report)
    if checked is None:
        return
    a, _, header, expected = checked
    for i in range(a.layers):
        for proj, dims in HF_PROJS.items():
            out, inp = dims(a)
            w = f"model.layers.{i}.{proj}.weight"
            blocks = out * inp // 64
            if inp % 64:
                report.errors.append(f"{w}: input dim {inp} is not a multiple of NF4's block of 64")
            expected.update({
                w: ({"U8"}, [[out * inp // 2, 1]], True), f"{w}.absmax": ({"U8"}, [[blocks]], True),
                f"{w}.nested_absmax": ({"F32"}, [[-(-blocks // 256)]], True),
                f"{w}.nested_quant_map": ({"F32"}, [[256]], True), f"{w}.quant_map": ({"F32"}, [[16]], True),
                f"{w}.quant_state.bitsandbytes__nf4": ({"U8"}, [[header.get(f"{w}.quant_state.bitsandbytes__nf4",
                                                                            {"shape": [0]})["shape"][0]]], True),
            })
    _compare(expected, header, "model", report)


def validate_peft(directory: Path, report: Report) -> None:
    report.kind = "peft-adapter"
    config = json.loads((directory / "adapter_config.json").read_text())
    if not _require(config, ["peft_type", "r", "lora_alpha", "target_modules"], "adapter_config.json", report):
        return
    if config["peft_type"] != "LORA":
        report.errors.append(f"adapter_config.json peft_type={config['peft_type']!r}, expected 'LORA'")
    files = sorted(directory.glob("adapter_model*.safetensors"))
    if not files:
        report.errors.append(f"{directory}: no adapter_model.safetensors")
        return
    header = {}
    for f in files:
        one = read_header(f)
        _check_file_layout(f, one, report)
        header.update(one)
    report.tensors = len(header)
    base = config.get("base_model_name_or_path")
    base_config = (directory / base / "config.json") if base else None
    if base_config is None or not base_config.is_file():
        report.warnings.append(f"base model {base!r} not found next to the adapter: shapes checked against r only")
        arch = None
    else:
        arch = _hf_arch(json.loads(base_config.read_text()))
    r, targets = config["r"], set(config["target_modules"])
    expected = {}
    layers = sorted({int(k.split(".")[4]) for k in header if k.startswith("base_model.model.model.layers.")})
    for i in layers:
        for proj, dims in HF_PROJS.items():
            if proj.split(".")[-1] not in targets:
                continue
            name = f"base_model.model.model.layers.{i}.{proj}"
            if arch is not None:
                out, inp = dims(arch)
            else:  # no base config: the other dims come from the adapter itself, the rank must be r
                a_shape = header.get(f"{name}.lora_A.weight", {"shape": [r, 0]})["shape"]
                b_shape = header.get(f"{name}.lora_B.weight", {"shape": [0, r]})["shape"]
                out, inp = b_shape[0], a_shape[-1]
            expected[f"{name}.lora_A.weight"] = ({"F32", "BF16", "F16"}, [[r, inp]], True)
            expected[f"{name}.lora_B.weight"] = ({"F32", "BF16", "F16"}, [[out, r]], True)
    if arch is not None and layers and layers != list(range(arch.layers)):
        report.errors.append(f"adapter covers layers {layers[0]}..{layers[-1]}, the base has {arch.layers}")
    _compare(expected, header, "adapter", report)

