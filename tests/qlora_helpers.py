"""Shared by the QLoRA tests: a tiny QLoRA model with trained-looking adapters, the TP=1
reference of an adapted layer, and the Hugging Face side (transformers + bitsandbytes + PEFT)."""
from __future__ import annotations

import torch

from nemo_quant.numerics.nf4 import nf4_dequantize, nf4_quantize


def perturb_adapters(model, seed: int = 1, scale: float = 0.05) -> None:
    """Random B (standard init leaves it 0, which would hide every adapter bug); every rank draws
    the full TP=1 B and keeps its share, so layouts agree."""
    from nemo_quant.qlora.modules import lora_layers
    from nemo_quant.quantization.algorithms.linear_view import local_output_rows
    from nemo_quant.quantization.algorithms.observe import tp_size_of

    for name, module in lora_layers(model):
        rows = module.lora_B.shape[0] * (1 if module._nq_weight_tp_axis == 1 else tp_size_of(module))
        g = torch.Generator().manual_seed(seed + sum(map(ord, _global(model, name))))
        full = torch.randn(rows, module.lora_B.shape[1], generator=g) * scale
        local = full if module._nq_weight_tp_axis == 1 else local_output_rows(module, full)
        with torch.no_grad():
            module.lora_B.copy_(local)


def _global(model, name):
    from nemo_quant.quantization.modules import global_name

    return global_name(model, name)


def reference_weight(w: torch.Tensor) -> torch.Tensor:
    """An HF tensor as bitsandbytes' NF4 gives it back (the pure-torch reference)."""
    return nf4_dequantize(nf4_quantize(w))


def hf_qlora_model(export_dir, trainable: bool = False):
    """transformers + bitsandbytes load the NF4 base; PEFT puts the adapter on it. bitsandbytes'
    CPU inference path repacks weights for a bf16 kernel (when the CPU has AVX512-BF16); it is
    switched off so that the comparison is with its fp32 dequantize + matmul."""
    import bitsandbytes as bnb
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(export_dir / "base", device_map="cpu", dtype=torch.float32)
    for m in base.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False
    return base, PeftModel.from_pretrained(base, export_dir / "adapter", is_trainable=trainable)
