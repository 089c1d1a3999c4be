"""The n:m check of `nemo-quant validate`: every linear a checkpoint declares sparse (HF
`sparsity_config`, TensorRT-LLM `sparsity`) must hold at most n nonzeros in every group of m
consecutive inputs of each weight row.

Unlike the header checks (validate.py) this reads tensor data: the stored codes, decoded
here independently of our writers. A zero is whatever the format stores for 0: the code 0 of
INT8/INT4, +0 or -0 of FP8 E4M3 and FP4 E2M1 (sign bit ignored), 0.0 of float weights.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import torch

_STRUCTURE = re.compile(r"^(\d+):(\d+)$")


def _nonzero(t: torch.Tensor, algo: str | None, in_features: int) -> torch.Tensor:
    """bool [out, in]: which weights of the stored tensor `t` are not zero."""
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):  # uint8/int8 [out/2, in]: rows 2j (low nibble) and 2j+1 (high)
        b = t.view(torch.uint8)
        return torch.stack([(b & 0xF) != 0, (b >> 4) != 0], dim=1).reshape(-1, b.shape[1])
    if algo == "NVFP4":  # uint8 [out, in/2]: elements 2j (low nibble) and 2j+1 (high); bit 3 is the sign
        b = t.view(torch.uint8)
        return torch.stack([(b & 0x7) != 0, ((b >> 4) & 0x7) != 0], dim=-1).reshape(b.shape[0], -1)
    if t.dtype == torch.float8_e4m3fn:
        return (t.view(torch.uint8) & 0x7F) != 0
    return t != 0


def check_declared(block: dict, tensors: Callable[[str], torch.Tensor | None], algo_of: Callable[[str], str | None],
                   where: str, errors: list[str]) -> int:
    """Check every target of a `sparsity_config` block; returns how many weights were checked.
    `tensors(module)` gives a module's stored weight (None if absent), `algo_of` its QuantAlgo."""
    match = _STRUCTURE.match(str(block.get("sparsity_structure", "")))
    if block.get("format") != "dense" or match is None:
        errors.append(f"{where}: sparsity block needs format 'dense' and sparsity_structure 'n:m' (got "
                      f"{block.get('format')!r}, {block.get('sparsity_structure')!r})")
        return 0
    n, m = map(int, match.groups())
    checked = 0
    for module in block.get("targets", []):
        weight = tensors(module)
        if weight is None:
            errors.append(f"{where}: sparse target {module} has no weight tensor")
            continue
        nz = _nonzero(weight, algo_of(module), weight.shape[-1])
        if nz.shape[1] % m:
            errors.append(f"{where}: {module}: input dim {nz.shape[1]} is not a multiple of m={m}")
            continue
        groups = nz.reshape(nz.shape[0], -1, m).sum(dim=-1)
        bad = int((groups > n).sum())
        if bad:
            errors.append(f"{where}: {module}.weight breaks its {n}:{m} pattern in {bad} of {groups.numel()} groups")
        checked += 1
    return checked


def hf_tensor_reader(directory: Path) -> Callable[[str], torch.Tensor | None]:
    from safetensors import safe_open

    owners = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            owners.update({k: f for k in fh.keys()})

    def read(module: str) -> torch.Tensor | None:
        name = f"{module}.weight"
        if name not in owners:
            return None
        with safe_open(str(owners[name]), framework="pt") as fh:
            return fh.get_tensor(name)

    return read
