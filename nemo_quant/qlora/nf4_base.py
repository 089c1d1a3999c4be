"""The frozen NF4 base of one Megatron linear layer, stored as bitsandbytes stores it, per TP rank.

Each Hugging Face tensor (q, k, v, o, gate, up, down) is quantized whole, exactly as
bitsandbytes would quantize it (numerics/nf4.py), on every rank from the TP-gathered weight
(the TP=1 computation, so every layout stores the same bytes). A rank keeps:
- `nf4_weight`  uint8 [rows, cols/2]: its rows (column parallel) or input columns (row
  parallel) of the packed codes; blocks of 64 never cross a row, so a TP slice of whole
  blocks is a slice of bnb's flat array;
- `nf4_absmax`  uint8 [rows, cols/64]: the 8-bit code of each of its blocks' absmax;
- `nf4_nested_absmax` fp32 and `nf4_offset` fp32 (one per Hugging Face tensor): the second
  level, replicated (a few hundred bytes per layer);
- `nf4_nested_index` (not saved; rebuilt from the layout): which nested scale each of its
  blocks uses, since bnb's 256-block groups run across rows and across TP slices.
"""
from __future__ import annotations

import torch
from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.numerics.nf4 import (
    NF4_BLOCK, NF4_SCALE_BLOCK, NF4Tensor, dequantize_packed_reference, dynamic_map, nf4_quantize, pack_nf4,
)
from nemo_quant.qlora.hf_parts import join_parts

BUFFERS = ("nf4_weight", "nf4_absmax", "nf4_nested_absmax", "nf4_offset")


def nf4_problem(name: str, module: nn.Module, row_parallel: bool) -> str | None:
    """Why this layer cannot hold an NF4 base at this layout, or None."""
    cols = module.input_size
    if cols % NF4_BLOCK:
        return (f"{name}: its input dim {cols} is not a multiple of NF4's block of {NF4_BLOCK} weights, so blocks "
                "would cross rows; leave it out of qlora.targets or use qlora.base_format=none.")
    local = module.weight.shape[1] if module.weight is not None else cols
    if row_parallel and local % NF4_BLOCK:
        return (f"{name}: at this TP each rank holds {local} of its {cols} input columns, which splits NF4 blocks of "
                f"{NF4_BLOCK} across ranks; choose a parallel.tp that keeps {cols} / TP a multiple of {NF4_BLOCK}.")
    return None


def quantize_base(view, name: str, parts: list[torch.Tensor], arch) -> tuple[dict[str, torch.Tensor], list[NF4Tensor]]:
    """This rank's NF4 buffers from the layer's full TP=1 Hugging Face tensors `parts` (split
    from `view`'s weight), and each part's NF4Tensor; the same on every layout. Input dims are
    multiples of 64, so the reference's per-row blocks are bnb's flat blocks."""
    tensors = [nf4_quantize(part) for part in parts]
    index, first_nested = [], 0
    for t in tensors:
        flat_block = torch.arange(t.scale_codes.numel(), dtype=torch.int32).reshape(t.scale_codes.shape)
        index.append(flat_block // NF4_SCALE_BLOCK + first_nested)
        first_nested += t.scale_scales.numel()
    share = view.local_share
    codes = join_parts([t.codes.reshape(t.shape) for t in tensors], name, arch)
    buffers = {
        "nf4_weight": pack_nf4(share(codes).contiguous()),
        "nf4_absmax": share(join_parts([t.scale_codes for t in tensors], name, arch)).contiguous(),
        "nf4_nested_absmax": torch.cat([t.scale_scales for t in tensors]),
        "nf4_offset": torch.stack([t.scale_mean for t in tensors]),
        "nf4_nested_index": share(join_parts(index, name, arch)).contiguous(),
        "nf4_part_of_nested": torch.cat([torch.full((t.scale_scales.numel(),), i, dtype=torch.int64)
                                         for i, t in enumerate(tensors)]),
    }
    return buffers, tensors


def install_base(module: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Replace the module's weight parameter by its NF4 buffers (the fp weight is freed)."""
    device = module.weight.device
    dtype = module.weight.dtype
    shape = tuple(module.weight.shape)
    del module.weight  # the Parameter
    for key, value in buffers.items():
        module.register_buffer(key, value.to(device), persistent=key in BUFFERS)
    # Megatron's forward reads `self.weight` (shape checks, the argument it hands _forward_impl,
    # which the QLoRA mixin ignores): a one-element tensor viewed at the weight's shape.
    module.weight = torch.empty((), dtype=dtype, device=device).expand(shape)


def block_absmax(module: nn.Module) -> torch.Tensor:
    """fp32 absmax of every local block: dynamic_map[code] * nested + offset (bnb's order).
    Cached (one fp32 per 64 weights) until a buffer it reads changes (a checkpoint load, a move)."""
    buffers = (module.nf4_absmax, module.nf4_nested_absmax, module.nf4_offset)
    key = tuple((t._version, t.data_ptr()) for t in buffers)
    if module.__dict__.get("_nq_absmax_key") != key:
        nested = module.nf4_nested_absmax
        offset = module.nf4_offset[module.nf4_part_of_nested]
        index = module.nf4_nested_index.long()
        absmax = dynamic_map().to(nested.device)[module.nf4_absmax.long()] * nested[index] + offset[index]
        module.__dict__["_nq_absmax"], module.__dict__["_nq_absmax_key"] = absmax, key
    return module.__dict__["_nq_absmax"]


def dequantize_base(module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """This rank's weight [rows, cols] in `dtype`, from the NF4 buffers (kernel when one runs)."""
    from nemo_quant.quantization.kernel_dispatch import backend_for

    packed, absmax = module.nf4_weight, block_absmax(module)
    backend = backend_for(packed.device)
    if backend is not None:
        return backend.nf4_dequantize(packed, absmax, NF4_BLOCK, dtype)
    return dequantize_packed_reference(packed, absmax, NF4_BLOCK, dtype)


def stored_bits(module: nn.Module) -> tuple[int, int]:
    """(bits stored for this rank's share of the base, weights it represents)."""
    weights = module.nf4_weight.numel() * 2
    bits = sum(getattr(module, k).numel() * getattr(module, k).element_size() * 8 for k in BUFFERS)
    return bits, weights


def check_nf4_layer(name: str, module: nn.Module, row_parallel: bool) -> None:
    problem = nf4_problem(name, module, row_parallel)
    if problem:
        raise ConfigError(problem)
