"""Typed configuration of the export step (Hydra group `export`, presets in conf/export/)."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Optional


class ExportTarget(str, Enum):
    hf = "hf"  # unified Hugging Face quantized checkpoint (TensorRT-LLM PyTorch, vLLM, SGLang)
    trtllm = "trtllm"  # config.json + rank{N}.safetensors (TensorRT-LLM <= 1.2 engine builds)
    both = "both"  # <path>/hf and <path>/trtllm
    # compressed-tensors (llm-compressor's format; vLLM's native int4/int8 loaders): INT4/INT8/FP8
    compressed_tensors = "compressed_tensors"
    # QLoRA / LoRA models (qlora/export.py): <path>/base (bitsandbytes NF4) + <path>/adapter (PEFT)
    peft = "peft"
    merged = "merged"  # dequant(W) + scaling * B A in export.dtype: a plain HF checkpoint
    # Speculative heads (speculative/export.py): EAGLE-3 draft, vLLM Medusa or DeepSeek-style MTP directory
    draft = "draft"


class ExportDType(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@dataclass
class ExportConfig:
    format: ExportTarget = ExportTarget.hf
    path: Optional[str] = None  # the checkpoint directory to create
    # High-precision tensors (norms, embeddings, unquantized layers, pre-quant scales); scales
    # stay float32. A dtype other than the model's rounds those tensors.
    dtype: ExportDType = ExportDType.bfloat16
    inference_tp: int = 1  # TensorRT-LLM checkpoint layout, independent of the training layout
    inference_pp: int = 1
    overwrite: bool = False  # replace an existing export.path
    max_shard_size_gb: float = 5.0  # HF checkpoint: split model*.safetensors above this size
    trtllm_architecture: str = "LlamaForCausalLM"


def as_export_config(cfg) -> ExportConfig:
    """A typed ExportConfig from a dataclass, a DictConfig or a plain dict (Hydra, Lightning and
    Python callers); an unknown key or a bad value fails here, naming it."""
    from omegaconf import OmegaConf

    if isinstance(cfg, ExportConfig):  # Python callers may pass strings for the enum fields
        cfg = OmegaConf.structured(cfg)
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExportConfig), cfg))
