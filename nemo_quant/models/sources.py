"""Weight sources: a Llama architecture plus full (unsharded) tensors under Hugging Face names.

Every importer produces this one canonical view (HF Llama names, rotate-half q/k layout,
fp32), so the Megatron side has a single mapping to maintain.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from nemo_quant.models.arch import LlamaArch


class WeightSource(Protocol):
    arch: LlamaArch

    def get(self, name: str) -> torch.Tensor: ...

    def names(self) -> list[str]: ...


@dataclass
class HFSafetensorsSource:
    """A Hugging Face `LlamaForCausalLM` directory (config.json + *.safetensors)."""

    path: Path
    arch: LlamaArch = field(init=False)
    _index: dict[str, Path] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        from safetensors import safe_open

        self.path = Path(self.path)
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"model.path={self.path} has no config.json; point model.path at a Hugging Face "
                "Llama checkpoint directory (config.json + *.safetensors)."
            )
        cfg = json.loads(config_file.read_text())
        archs = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") not in ("llama", "mistral", "qwen2") or "ForCausalLM" not in archs[0]:
            raise ValueError(f"model.path={self.path}: unsupported architecture {archs} (Llama-style models only).")
        heads = cfg["num_attention_heads"]
        self.arch = LlamaArch(
            num_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            num_attention_heads=heads,
            num_query_groups=cfg.get("num_key_value_heads", heads),
            ffn_hidden_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rotary_base=float(cfg.get("rope_theta", 10000.0)),
            norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # a pruned export keeps its heads' width apart from hidden_size / heads
            kv_channels=cfg.get("head_dim") if cfg.get("head_dim") != cfg["hidden_size"] // heads else None,
        )
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"model.path={self.path} holds no *.safetensors files.")
        for f in files:
            with safe_open(f, framework="pt") as handle:
                for key in handle.keys():
                    self._index[key] = f

    def names(self) -> list[str]:
        return sorted(self._index)

    def raw(self, name: str) -> torch.Tensor:
        """The tensor as stored (packed integers, float8, ...)."""
        from safetensors import safe_open

        if name not in self._index:
            raise KeyError(f"{self.path}: tensor {name!r} not found in the safetensors files")
        with safe_open(self._index[name], framework="pt") as handle:
            return handle.get_tensor(name)

    def get(self, name: str) -> torch.Tensor:
        return self.raw(name).float()


# GGUF tensor names -> HF names ({i} is the layer index).
_GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def gguf_to_hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        key = ".".join(["blk", "{i}", *parts[2:]])
        return _GGUF_TO_HF[key].format(i=parts[1])
    return _GGUF_TO_HF[name]


def unpermute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation.

    llama.cpp stores each head's rows interleaved as (x0, x_half, x1, x_half+1, ...) so that
    its RoPE rotates adjacent pairs; HF/Megatron rotate the two halves of a head instead.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class GGUFSource:
    """A llama.cpp GGUF file (any quantization gguf-py can dequantize), read lazily."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model.path={self.path} does not exist.")
        self.reader = GGUFReader(self.path)
        arch_name = self._field("general.architecture")
        if arch_name != "llama":
            raise ValueError(f"model.path={self.path}: GGUF architecture {arch_name!r} is not supported (llama only).")
        self._tensors = {gguf_to_hf_name(t.name): t for t in self.reader.tensors}
        heads = int(self._field("llama.attention.head_count"))
        self.arch = LlamaArch(
            num_layers=int(self._field("llama.block_count")),
            hidden_size=int(self._field("llama.embedding_length")),
            num_attention_heads=heads,
            num_query_groups=int(self._field("llama.attention.head_count_kv", heads)),
            ffn_hidden_size=int(self._field("llama.feed_forward_length")),
            vocab_size=len(self.reader.fields["tokenizer.ggml.tokens"].data),
            max_position_embeddings=int(self._field("llama.context_length", 2048)),
            rotary_base=float(self._field("llama.rope.freq_base", 10000.0)),
            norm_eps=float(self._field("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            tie_word_embeddings="lm_head.weight" not in self._tensors,
        )

    def _field(self, key: str, default=None):
        field_ = self.reader.fields.get(key)
        if field_ is None:
            if default is None:
                raise KeyError(f"{self.path}: GGUF metadata key {key!r} missing")
            return default
        return field_.contents()

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def get_raw(self, name: str) -> torch.Tensor:
        """The dequantized tensor exactly as stored (llama.cpp q/k layout)."""
        from gguf import dequantize

        t = self._tensors[name]
        return torch.from_numpy(dequantize(t.data, t.tensor_type).copy()).float()

    def get(self, name: str) -> torch.Tensor:
        w = self.get_raw(name)
        if name.endswith("q_proj.weight"):
            return unpermute_rotary(w, self.arch.num_attention_heads)
        if name.endswith("k_proj.weight"):
            return unpermute_rotary(w, self.arch.num_query_groups)
        return w


def open_source(path: str | Path) -> WeightSource:
    """Pick the reader by what `path` is: a .gguf file or an HF safetensors directory."""
    path = Path(path)
    if path.suffix == ".gguf":
        return GGUFSource(path)
    if path.is_dir():
        return HFSafetensorsSource(path)
    raise ValueError(
        f"model.path={path}: expected a .gguf file or a Hugging Face safetensors directory."
    )


