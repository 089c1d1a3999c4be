"""QLoRA / LoRA linear layers: a Column/RowParallelLinear with a frozen base and adapters.

Conversion stacks `LoRALinearMixin` on the module's class (models/gemm_operands.py). The base
GEMM goes through `frozen_linear` (no weight gradient, no saved weight): from the NF4 buffers
(qlora.base_format=nf4) or from the frozen weight as loaded (base_format=none, plain LoRA),
one code path for both. Megatron's own forward still does the TP communication around it;
the adapter's output is added after (adapters.py says how it splits over TP).
"""
from __future__ import annotations

import zlib

import torch
from torch import nn

from nemo_quant.models.gemm_operands import GemmOperandsMixin, mark_linear_layout, stacked_class
from nemo_quant.numerics.nf4 import nf4_dequantize
from nemo_quant.qlora import adapters, nf4_base
from nemo_quant.qlora.frozen_matmul import frozen_linear


class LoRALinearMixin(GemmOperandsMixin):
    _nq_nf4 = False

    def _materialize(self, dtype: torch.dtype) -> torch.Tensor:
        if self._nq_nf4:
            return nf4_base.dequantize_base(self, dtype)
        return self.weight.detach().to(dtype)

    def _forward_impl(self, input, weight, bias, *args, allreduce_dgrad=False, tp_group=None, **kwargs):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        if allreduce_dgrad:  # what Megatron's GEMM does for column-parallel input gradients
            input = copy_to_tensor_model_parallel_region(input, group=tp_group)
        out = frozen_linear(input, self._materialize)
        return out + bias if bias is not None else out

    def forward(self, input_, *args, **kwargs):
        out, bias = super().forward(input_, *args, **kwargs)
        return out + adapters.lora_delta(self, input_).to(out.dtype), bias

    def tp_axis_map(self) -> dict[str, int]:
        axis = self._nq_weight_tp_axis
        lora = {"lora_A": 1} if axis == 1 else {"lora_B": 0}
        nf4 = {"nf4_weight": axis, "nf4_absmax": axis} if self._nq_nf4 else {}
        return {**super().tp_axis_map(), **nf4, **lora}

    def swiglu_row_keys(self) -> list[str]:
        keys = ["lora_B"] + (["nf4_weight", "nf4_absmax"] if self._nq_nf4 else [])
        return [*super().swiglu_row_keys(), *keys]


def convert_to_lora(name: str, module: nn.Module, cfg, weight_tp_axis: int) -> None:
    """Freeze the base (NF4 or as loaded), add adapters, swap the class. `name`: the global name."""
    from nemo_quant.models.arch import arch_of_config
    from nemo_quant.qlora.config import AdapterDType, AdapterInit, BaseFormat
    from nemo_quant.qlora.hf_parts import join_parts, split_parts
    from nemo_quant.quantization.algorithms.linear_view import LinearView

    mark_linear_layout(module, name, weight_tp_axis)
    view = LinearView(name, module)
    arch = arch_of_config(module.config)
    device = module.weight.device
    nf4 = BaseFormat(cfg.base_format) == BaseFormat.nf4
    parts = split_parts(view.weight, name, arch, view.gated)
    if nf4:
        buffers, quantized = nf4_base.quantize_base(view, name, parts, arch)
        nf4_base.install_base(module, buffers)
    else:
        module.weight.requires_grad_(False)
    seed = zlib.crc32(f"{cfg.seed}:{name}".encode())
    if AdapterInit(cfg.init) == AdapterInit.loftq:  # validation allows it with the NF4 base only
        inits = [adapters.residual_init(w - nf4_dequantize(t), cfg.rank, cfg.scaling) for w, t in zip(parts, quantized)]
    else:
        inits = [adapters.standard_init(cfg.rank, w.shape[0], w.shape[1], seed + i) for i, w in enumerate(parts)]
    a_full = torch.cat([a for a, _ in inits])
    b_full = join_parts([b for _, b in inits], name, arch)
    part_of_row = join_parts([torch.full((w.shape[0], 1), i) for i, w in enumerate(parts)], name, arch).reshape(-1)
    dtype = torch.float32 if AdapterDType(cfg.adapter_dtype) == AdapterDType.float32 else torch.bfloat16
    adapters.install_adapters(module, a_full, b_full, part_of_row, view, dtype, device)
    module._nq_lora_scaling = cfg.scaling
    module._nq_lora_dropout = cfg.dropout
    module._nq_lora_seed = seed * 4099 + _data_parallel_rank()  # dropout: the same on TP ranks, not on DP replicas
    module._nq_nf4 = nf4
    module.__class__ = stacked_class(module, LoRALinearMixin, "LoRA")
    module._nq_nf4 = nf4  # instance attribute: the class default stays False


def _data_parallel_rank() -> int:
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_rank() if ps.model_parallel_is_initialized() else 0


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(local name, module) of every adapted linear layer of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinearMixin)]
