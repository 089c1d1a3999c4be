"""Tiny Llama checkpoints written by the tests: an HF safetensors directory and a GGUF file
holding the same weights (the GGUF with llama.cpp's q/k permutation and a byte-level BPE
tokenizer), so both importers can be checked against each other and against the reference."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.tokenizer import byte_level_bpe

TINY = LlamaArch(num_layers=4, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=96, vocab_size=257, max_position_embeddings=128,
                 rotary_base=10000.0, norm_eps=1e-5, tie_word_embeddings=True)

# QLoRA's tiny model: every input dim a multiple of NF4's block of 64 at TP=1 and TP=2, and
# fc1's blocks split over TP=2 in the middle of a 256-block group of the second quantization level.
QTINY = LlamaArch(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                  ffn_hidden_size=384, vocab_size=257, max_position_embeddings=128,
                  rotary_base=10000.0, norm_eps=1e-5, tie_word_embeddings=True)


def tiny_hf_tensors(arch: LlamaArch = TINY, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size

    def rand(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    t = {"model.embed_tokens.weight": rand(arch.vocab_size, h, scale=0.5), "model.norm.weight": 1 + rand(h, scale=0.1)}
    if not arch.tie_word_embeddings:
        t["lm_head.weight"] = rand(arch.vocab_size, h, scale=0.2)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + rand(h, scale=0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + rand(h, scale=0.1)
        t[p + "self_attn.q_proj.weight"] = rand(arch.num_attention_heads * d, h, scale=0.2)
        t[p + "self_attn.k_proj.weight"] = rand(arch.num_query_groups * d, h, scale=0.2)
        t[p + "self_attn.v_proj.weight"] = rand(arch.num_query_groups * d, h)
        t[p + "self_attn.o_proj.weight"] = rand(h, arch.num_attention_heads * d)
        t[p + "mlp.gate_proj.weight"] = rand(f, h)
        t[p + "mlp.up_proj.weight"] = rand(f, h)
        t[p + "mlp.down_proj.weight"] = rand(h, f)
    return t


def write_hf_checkpoint(directory: Path, arch: LlamaArch = TINY, seed: int = 0,
                        tensors: dict[str, torch.Tensor] | None = None) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = tiny_hf_tensors(arch, seed) if tensors is None else tensors
    names = sorted(tensors)
    half = len(names) // 2  # two shards, as large checkpoints come
    save_file({n: tensors[n].contiguous() for n in names[:half]}, str(directory / "model-00001-of-00002.safetensors"))
    save_file({n: tensors[n].contiguous() for n in names[half:]}, str(directory / "model-00002-of-00002.safetensors"))
    byte_level_bpe(byte_level_vocab() + ["<|endoftext|>"], [], [1] * 256 + [3], False).save(str(directory / "tokenizer.json"))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "num_hidden_layers": arch.num_layers, "hidden_size": arch.hidden_size,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_query_groups,
        "intermediate_size": arch.ffn_hidden_size, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings, "rope_theta": arch.rotary_base,
        "rms_norm_eps": arch.norm_eps, "tie_word_embeddings": arch.tie_word_embeddings, "head_dim": arch.head_dim,
    }))
    return directory


def permute_rotary(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's conversion-time permutation (what `unpermute_rotary` must undo)."""
    rows, cols = w.shape
    return w.reshape(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def byte_level_vocab() -> list[str]:
    """GPT-2's byte -> printable-unicode alphabet, in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def write_gguf_checkpoint(path: Path, arch: LlamaArch = TINY, seed: int = 0) -> Path:
    import gguf

    assert arch.vocab_size == 257, "the tiny tokenizer has 256 byte tokens + <|endoftext|>"
    tensors = tiny_hf_tensors(arch, seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(arch.num_layers)
    w.add_context_length(arch.max_position_embeddings)
    w.add_embedding_length(arch.hidden_size)
    w.add_feed_forward_length(arch.ffn_hidden_size)
    w.add_head_count(arch.num_attention_heads)
    w.add_head_count_kv(arch.num_query_groups)
    w.add_rope_freq_base(arch.rotary_base)
    w.add_layer_norm_rms_eps(arch.norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(byte_level_vocab() + ["<|endoftext|>"])
    w.add_token_types([1] * 256 + [3])
    w.add_token_merges([])
    hf_to_gguf = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
        "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight",
    }
    for name, tensor in tensors.items():
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            leaf = ".".join(rest)
            gname = f"blk.{i}.{per_layer[leaf]}"
            if leaf == "self_attn.q_proj.weight":
                tensor = permute_rotary(tensor, arch.num_attention_heads)
            elif leaf == "self_attn.k_proj.weight":
                tensor = permute_rotary(tensor, arch.num_query_groups)
        else:
            gname = hf_to_gguf[name]
        w.add_tensor(gname, tensor.numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
