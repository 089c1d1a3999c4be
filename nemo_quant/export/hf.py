"""Unified Hugging Face quantized checkpoint (what TensorRT-LLM's PyTorch backend, vLLM and
SGLang load): full (un-sharded) tensors under HF Llama names, `config.json` with a flat
`quantization_config`, `hf_quant_config.json` (nested), tokenizer and generation config.
Spec: checkpoint-formats.md section 5.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_quant.export.formats import (
    ExportFormat, QuantizedLinear, pack_e2m1, pack_int4_rows,
)
from nemo_quant.export.hf_layout import HFLayer
from nemo_quant.export.quant_summary import QuantSummary
from nemo_quant.export.safetensors_writer import ShardedWriter
from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.loading import DTYPE_NAMES

# Projections whose pre-quant scale a loader reads (q/k/v and gate/up have theirs folded
# into the norms); INT8 SmoothQuant declares one on every linear.
UNFUSED = ("self_attn.o_proj", "mlp.down_proj")


def hf_linear_tensors(ql: QuantizedLinear, proj: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    f = ql.fmt
    if f == ExportFormat.none:
        return {"weight": ql.weight.to(dtype)}
    out: dict[str, torch.Tensor] = {}
    if f in (ExportFormat.w4a16_awq, ExportFormat.w4a8_awq):
        out["weight"] = pack_int4_rows(ql.weight)
    elif f == ExportFormat.nvfp4:
        out["weight"] = pack_e2m1(ql.weight)
    else:  # fp8 codes, int8 codes
        out["weight"] = ql.weight
    out["weight_scale"] = ql.weight_scale
    if ql.weight_scale_2 is not None:
        out["weight_scale_2"] = ql.weight_scale_2.reshape(())
    if ql.input_scale is not None:
        out["input_scale"] = ql.input_scale.reshape(())
    if ql.pre_quant_scale is not None and (f == ExportFormat.int8_sq or proj in UNFUSED):
        out["pre_quant_scale"] = ql.pre_quant_scale.to(dtype)
    return out


class HFWriter:
    """Consumes the export stream and writes the directory (already a staging directory)."""

    # Where the FP8 KV-cache scales go (ModelOpt's HF names, 0-d).
    KV_SCALE_NAMES, KV_SCALE_SHAPE = ("self_attn.k_proj.k_scale", "self_attn.v_proj.v_scale"), ()

    def __init__(self, directory: Path, arch: LlamaArch, dtype: torch.dtype, max_shard_bytes: int):
        self.directory, self.arch, self.dtype = Path(directory), arch, dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        self.tensors = ShardedWriter(self.directory, "model", max_shard_bytes)

    def embedding(self, weight: torch.Tensor) -> None:
        self.tensors.add("model.embed_tokens.weight", weight.to(self.dtype))

    def layer(self, layer: HFLayer) -> None:
        prefix = f"model.layers.{layer.index}."
        for name, t in layer.norms.items():
            self.tensors.add(prefix + name, t.to(self.dtype))
        for proj, ql in layer.linears.items():
            for suffix, t in self.linear_tensors(ql, proj, prefix + proj).items():
                self.tensors.add(f"{prefix}{proj}.{suffix}", t)
        if layer.kv_scales is not None:
            for name, scale in zip(self.KV_SCALE_NAMES, layer.kv_scales):
                self.tensors.add(prefix + name, scale.reshape(self.KV_SCALE_SHAPE))

    def linear_tensors(self, ql: QuantizedLinear, proj: str, where: str) -> dict[str, torch.Tensor]:
        return hf_linear_tensors(ql, proj, self.dtype)

    def head(self, norm: torch.Tensor, output: torch.Tensor | None) -> None:
        self.tensors.add("model.norm.weight", norm.to(self.dtype))
        if output is not None:
            self.tensors.add("lm_head.weight", output.to(self.dtype))

    def finish(self, summary: QuantSummary, tokenizer, producer: dict) -> list[Path]:
        files = self.tensors.close()
        config = hf_model_config(self.arch, self.dtype, tokenizer)
        sparsity = summary.sparsity_config()
        if sparsity is not None:
            config["sparsity_config"] = sparsity
        flat, nested = self.quantization_blocks(summary, producer)
        if flat is not None:
            config["quantization_config"] = flat
        if nested is not None:
            _write_json(self.directory / "hf_quant_config.json", {**nested, "sparsity": sparsity} if sparsity else nested)
        _write_json(self.directory / "config.json", config)
        _write_json(self.directory / "generation_config.json", {
            k: v for k, v in (("bos_token_id", config.get("bos_token_id")), ("eos_token_id", config.get("eos_token_id")))
            if v is not None})
        if tokenizer is not None:
            tokenizer.save(str(self.directory / "tokenizer.json"))
            _write_json(self.directory / "tokenizer_config.json", _tokenizer_config(tokenizer))
        return files

    def quantization_blocks(self, summary: QuantSummary, producer: dict) -> tuple[dict | None, dict | None]:
        """(config.json `quantization_config`, hf_quant_config.json content), None where absent."""
        quant = summary.hf_quant_config()
        if quant["quant_algo"] is None and not quant.get("kv_cache_quant_algo"):
            return None, None
        return summary.flat_quantization_config(producer), {"producer": producer, "quantization": quant}

    def abort(self) -> None:
        self.tensors.abort()


def _special_ids(tokenizer) -> tuple[int | None, int | None]:
    if tokenizer is None:
        return None, None
    specials = [t for t in tokenizer.get_added_tokens_decoder().values() if t.special]
    names = [t.content for t in specials]
    bos = next((n for n in names if n in ("<|begin_of_text|>", "<s>", "<|im_start|>", "<|endoftext|>")), None)
    eos = next((n for n in names if n in ("<|end_of_text|>", "</s>", "<|im_end|>", "<|endoftext|>")), None)
    return (tokenizer.token_to_id(bos) if bos else None), (tokenizer.token_to_id(eos) if eos else None)


def hf_model_config(arch: LlamaArch, dtype: torch.dtype, tokenizer=None) -> dict:
    bos, eos = _special_ids(tokenizer)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "torch_dtype": DTYPE_NAMES[dtype],
        "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size,
        "num_hidden_layers": arch.num_layers, "num_attention_heads": arch.num_attention_heads,
        "num_key_value_heads": arch.num_query_groups, "head_dim": arch.head_dim, "hidden_act": "silu",
        "max_position_embeddings": arch.max_position_embeddings, "rms_norm_eps": arch.norm_eps,
        "rope_theta": arch.rotary_base, "tie_word_embeddings": arch.tie_word_embeddings,
        "vocab_size": arch.vocab_size, "attention_bias": False, "mlp_bias": False,
    }
    if bos is not None:
        config["bos_token_id"] = bos
    if eos is not None:
        config["eos_token_id"] = eos
    return config


def _tokenizer_config(tokenizer) -> dict:
    bos, eos = _special_ids(tokenizer)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    if bos is not None:
        config["bos_token"] = tokenizer.id_to_token(bos)
    if eos is not None:
        config["eos_token"] = tokenizer.id_to_token(eos)
    return config


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
