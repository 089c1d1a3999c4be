"""A Megatron linear layer as the Hugging Face tensors it fuses (TP=1 row order).

QLoRA quantizes, and PEFT names adapters, per Hugging Face tensor: linear_qkv holds q, k and
v (rows grouped per KV group, models/megatron_layout.py), a gated linear_fc1 holds gate and
up; every other linear is one tensor (their HF names: export/hf_layout.py SPLITS). These two
functions split and join any tensor laid out along the weight's rows (codes, scales, adapter
B, part ids) with the layout rules of `megatron_layout` rather than restating them.
"""
from __future__ import annotations

import torch

from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.megatron_layout import interleave_qkv, split_qkv


def leaf_of(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def split_parts(full: torch.Tensor, name: str, arch: LlamaArch, gated: bool) -> list[torch.Tensor]:
    """A full [out, ...] tensor in TP=1 row order -> one tensor per Hugging Face module."""
    leaf = leaf_of(name)
    if leaf == "linear_qkv":
        return list(split_qkv(full, arch))
    if leaf == "linear_fc1" and gated:
        return list(full.chunk(2, dim=0))
    return [full]


def join_parts(parts: list[torch.Tensor], name: str, arch: LlamaArch) -> torch.Tensor:
    """Inverse of `split_parts`."""
    if leaf_of(name) == "linear_qkv":
        return interleave_qkv(*parts, arch, 0, 1)
    return torch.cat(parts) if len(parts) > 1 else parts[0]
