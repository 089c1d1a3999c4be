"""A gathered QLoRA decoder layer in Hugging Face terms, and the three writers of its exports.

The export stream (export/gather.py) hands each layer TP-gathered in TP=1 order; this module
splits every adapted Megatron linear into its Hugging Face projections (hf_parts.py):
- `BnbNF4Writer`: the NF4 base as bitsandbytes serializes a prequantized `Linear4bit`
  (`weight` [n/2, 1] uint8, `weight.absmax`, `weight.nested_absmax`, `weight.nested_quant_map`,
  `weight.quant_map`, `weight.quant_state.bitsandbytes__nf4`), with `quant_method: bitsandbytes`;
  transformers + bitsandbytes load it with `from_pretrained`. A plain LoRA's base is written
  unquantized.
- `PeftWriter`: `adapter_config.json` + `adapter_model.safetensors` under PEFT's names
  (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, ...): PEFT, vLLM, SGLang
  and TensorRT-LLM load it over the base. Fused adapters are split: q, k and v each get their
  own A (the r rows of the fused A that their rows read) and their rows of B.
- `MergedWriter`: the merged model, dequant(W) + scaling * B A, through the plain HF writer.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_quant.export.gather import LayerPiece
from nemo_quant.export.hf import HFWriter
from nemo_quant.export.hf_layout import NORMS, SPLITS
from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.loading import DTYPE_NAMES
from nemo_quant.numerics.blocks import num_blocks
from nemo_quant.numerics.nf4 import (
    NF4_BLOCK, NF4_CODEBOOK, NF4_SCALE_BLOCK, dequantize_packed_reference, double_dequantize, dynamic_map,
)
from nemo_quant.qlora.hf_parts import split_parts

log = logging.getLogger(__name__)


@dataclass
class NF4Part:
    """One Hugging Face tensor's NF4 storage, exactly as bitsandbytes holds it."""

    packed: torch.Tensor  # uint8 [rows, cols/2]
    absmax_codes: torch.Tensor  # uint8 [rows, cols/64]
    nested: torch.Tensor  # fp32 [ceil(rows * cols/64 / 256)]
    offset: torch.Tensor  # fp32 0-d

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        absmax = double_dequantize(self.absmax_codes, self.nested, self.offset)
        return dequantize_packed_reference(self.packed, absmax, NF4_BLOCK, torch.float32)


@dataclass
class QLoRALinear:
    base: torch.Tensor | NF4Part  # the frozen weight (fp) or its NF4 storage
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]

    def base_weight(self) -> torch.Tensor:
        return self.base.dequantize() if isinstance(self.base, NF4Part) else self.base.float()


@dataclass
class QLoRALayer:
    index: int
    norms: dict[str, torch.Tensor]
    projs: dict[str, QLoRALinear] = field(default_factory=dict)  # adapted projections by HF name
    plain: dict[str, torch.Tensor] = field(default_factory=dict)  # projections without adapters
    linears: dict = field(default_factory=dict)  # what a writer writes per projection (HFWriter.layer)
    kv_scales: None = None


def convert_qlora_layer(piece: LayerPiece, arch: LlamaArch) -> QLoRALayer:
    t = piece.tensors
    layer = QLoRALayer(piece.index, {hf: t[mg] for mg, hf in NORMS.items()})
    for megatron, projs in SPLITS.items():
        gated = megatron.endswith("linear_fc1")
        if f"{megatron}.lora_A" not in t:
            layer.plain.update(zip(projs, split_parts(t[f"{megatron}.weight"], megatron, arch, gated)))
            continue
        a, b = t[f"{megatron}.lora_A"], t[f"{megatron}.lora_B"]
        bases = _nf4_parts(t, megatron, arch, gated) if f"{megatron}.nf4_weight" in t else \
            split_parts(t[f"{megatron}.weight"], megatron, arch, gated)
        b_parts = split_parts(b, megatron, arch, gated)
        a_parts = a.chunk(len(b_parts), dim=0)
        for proj, base, ap, bp in zip(projs, bases, a_parts, b_parts):
            layer.projs[proj] = QLoRALinear(base, ap, bp)
    return layer


def _nf4_parts(t: dict, megatron: str, arch: LlamaArch, gated: bool) -> list[NF4Part]:
    packed = split_parts(t[f"{megatron}.nf4_weight"], megatron, arch, gated)
    codes = split_parts(t[f"{megatron}.nf4_absmax"], megatron, arch, gated)
    nested, offsets = t[f"{megatron}.nf4_nested_absmax"], t[f"{megatron}.nf4_offset"]
    parts, start = [], 0
    for i, (p, c) in enumerate(zip(packed, codes)):
        count = num_blocks(c.numel(), NF4_SCALE_BLOCK)  # bnb's 256-block groups over the flat tensor
        parts.append(NF4Part(p.contiguous(), c.contiguous(), nested[start:start + count], offsets[i]))
        start += count
    return parts


def bnb_tensors(part: NF4Part, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """bitsandbytes' serialization of one prequantized Linear4bit weight."""
    rows, cols = part.shape
    state = {"quant_type": "nf4", "blocksize": NF4_BLOCK, "dtype": DTYPE_NAMES[dtype], "shape": [rows, cols],
             "nested_blocksize": NF4_SCALE_BLOCK, "nested_dtype": "float32", "nested_offset": float(part.offset)}
    return {
        "weight": part.packed.reshape(-1, 1),
        "weight.absmax": part.absmax_codes.reshape(-1),
        "weight.nested_absmax": part.nested.float(),
        "weight.nested_quant_map": dynamic_map().clone(),
        "weight.quant_map": NF4_CODEBOOK.clone(),
        "weight.quant_state.bitsandbytes__nf4": torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8),
    }


def bnb_quantization_config(dtype: torch.dtype) -> dict:
    return {
        "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_compute_dtype": DTYPE_NAMES[dtype], "bnb_4bit_quant_storage": "uint8",
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
    }


class TensorsWriter(HFWriter):
    """The HF writer fed with layers whose projections are already HF tensors by suffix."""

    def linear_tensors(self, tensors, proj, where):
        return tensors


class BnbNF4Writer(TensorsWriter):
    def __init__(self, *args, nf4: bool, **kwargs):
        super().__init__(*args, **kwargs)
        self.nf4 = nf4

    def layer(self, layer: QLoRALayer) -> None:
        layer.linears = {p: {"weight": w.to(self.dtype)} for p, w in layer.plain.items()}
        for proj, ql in layer.projs.items():
            nf4 = isinstance(ql.base, NF4Part)
            layer.linears[proj] = bnb_tensors(ql.base, self.dtype) if nf4 else {"weight": ql.base.to(self.dtype)}
        super().layer(layer)

    def quantization_blocks(self, summary, producer):
        return (bnb_quantization_config(self.dtype), None) if self.nf4 else (None, None)


class MergedWriter(TensorsWriter):
    """Writes the merge and measures what an NF4 re-quantization of it would keep of the adapters."""

    def __init__(self, *args, scaling: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.scaling = scaling
        self.lost_sq = self.update_sq = 0.0

    def layer(self, layer: QLoRALayer) -> None:
        layer.linears = {p: {"weight": w.to(self.dtype)} for p, w in layer.plain.items()}
        for proj, ql in layer.projs.items():
            merged = merged_weight(ql, self.scaling)
            self._measure(ql.base_weight(), merged)
            layer.linears[proj] = {"weight": merged.to(self.dtype)}
        super().layer(layer)

    def _measure(self, base: torch.Tensor, merged: torch.Tensor) -> None:
        from nemo_quant.numerics.nf4 import fake_quant_nf4

        update = merged - base
        kept = fake_quant_nf4(merged) - fake_quant_nf4(base)
        self.lost_sq += float((kept - update).double().pow(2).sum())
        self.update_sq += float(update.double().pow(2).sum())

    def nf4_update_loss(self) -> float | None:
        """||NF4(W + dW) - NF4(W) - dW|| / ||dW|| over every adapted weight (None without an update)."""
        return (self.lost_sq / self.update_sq) ** 0.5 if self.update_sq > 0 else None

    def finish(self, summary, tokenizer, producer: dict) -> list[Path]:
        files = super().finish(summary, tokenizer, producer)
        loss = self.nf4_update_loss()
        if loss is not None:
            log.warning("merged export: re-quantizing this merge to NF4 would lose %.0f%% of the adapters' update "
                        "(measured ||NF4(W + dW) - NF4(W) - dW|| / ||dW|| = %.3f over every adapted weight); quantize "
                        "it with a finer format (fp8, int8, int4 AWQ) or serve the adapter unmerged (export=peft).",
                        100 * min(loss, 1.0), loss)
        return files


def merged_weight(ql: QLoRALinear, scaling: float) -> torch.Tensor:
    return ql.base_weight() + scaling * (ql.lora_b.double() @ ql.lora_a.double()).float()


class PeftWriter:
    PREFIX = "base_model.model.model.layers"

    def __init__(self, directory: Path, cfg, base_path: str | None):
        from nemo_quant.export.safetensors_writer import ShardedWriter

        self.directory, self.cfg, self.base_path = Path(directory), cfg, base_path
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tensors = ShardedWriter(self.directory, "adapter_model", 0)
        self.targets: set[str] = set()

    def embedding(self, weight) -> None:
        pass

    def head(self, norm, output) -> None:
        pass

    def layer(self, layer: QLoRALayer) -> None:
        for proj, ql in layer.projs.items():
            name = f"{self.PREFIX}.{layer.index}.{proj}"
            self.tensors.add(f"{name}.lora_A.weight", ql.lora_a.contiguous())
            self.tensors.add(f"{name}.lora_B.weight", ql.lora_b.contiguous())
            self.targets.add(proj.split(".")[-1])

    def finish(self, summary, tokenizer, producer: dict) -> list[Path]:
        from nemo_quant.qlora.config import AdapterInit

        files = self.tensors.close()
        cfg = self.cfg
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_path,
            "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "use_rslora": cfg.rslora,
            "target_modules": sorted(self.targets), "bias": "none", "fan_in_fan_out": False,
            "init_lora_weights": AdapterInit(cfg.init) == AdapterInit.standard, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None, "revision": None,
        }
        (self.directory / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return files + [self.directory / "adapter_config.json"]

    def abort(self) -> None:
        self.tensors.abort()
