"""Where each Hugging Face Llama tensor lives in a TP-sharded Megatron GPTModel (local spec).

Layout rules (both directions use them):
- linear_qkv rows are grouped by query group: for each KV group g, the group's
  `heads/groups` query heads, then its key head, then its value head. A TP rank owns
  `groups/tp` consecutive groups.
- linear_fc1 rows are [gate; up] *per rank*: rank r holds gate[r-th slice] then up[r-th slice].
- Column-parallel (qkv, fc1, embeddings, output layer) split rows; row-parallel (proj, fc2)
  split columns. Norms are replicated.
- The vocabulary is padded (zeros) so each TP rank holds an equal slice.
"""
from __future__ import annotations

import torch

from nemo_quant.models.arch import LlamaArch


def interleave_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, arch: LlamaArch, tp_rank: int, tp: int) -> torch.Tensor:
    d, groups = arch.head_dim, arch.num_query_groups
    per_group = arch.num_attention_heads // groups
    q = q.reshape(groups, per_group * d, -1)
    k = k.reshape(groups, d, -1)
    v = v.reshape(groups, d, -1)
    fused = torch.cat([q, k, v], dim=1)  # [groups, (per_group + 2) * d, in]
    local = groups // tp
    return fused[tp_rank * local:(tp_rank + 1) * local].reshape(-1, fused.shape[-1])


def split_qkv(fused: torch.Tensor, arch: LlamaArch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `interleave_qkv` for a full (TP-gathered, in rank order) fused tensor."""
    d = arch.head_dim
    per_group = arch.num_attention_heads // arch.num_query_groups
    g = fused.reshape(-1, (per_group + 2) * d, *fused.shape[1:])
    q = g[:, : per_group * d].reshape(-1, *fused.shape[1:])
    k = g[:, per_group * d: (per_group + 1) * d].reshape(-1, *fused.shape[1:])
    v = g[:, (per_group + 1) * d:].reshape(-1, *fused.shape[1:])
    return q, k, v


def rows(t: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=0)[tp_rank]


def cols(t: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    return t.chunk(tp, dim=1)[tp_rank]


def fc1_rows_of_rank(t: torch.Tensor, tp_rank: int, tp: int) -> torch.Tensor:
    """Gated fc1 rows [gate; up] (TP=1 order) -> this rank's [gate_r; up_r]."""
    gate, up = t.chunk(2, dim=0)
    return torch.cat([rows(gate, tp_rank, tp), rows(up, tp_rank, tp)])


def fc1_rows_in_tp1_order(t: torch.Tensor, tp: int) -> torch.Tensor:
    """Inverse of `fc1_rows_of_rank` over all ranks: [gate_0; up_0; gate_1; up_1; ...] -> [gate; up]."""
    if tp == 1:
        return t
    return t.reshape(tp, 2, t.shape[0] // (2 * tp), *t.shape[1:]).transpose(0, 1).reshape(t.shape)


def pad_vocab(t: torch.Tensor, padded: int) -> torch.Tensor:
    if t.shape[0] == padded:
        return t
    return torch.cat([t, t.new_zeros(padded - t.shape[0], *t.shape[1:])])


def megatron_tensor(name: str, get, arch: LlamaArch, tp_rank: int, tp: int, layer_of, padded_vocab: int) -> torch.Tensor:
    """The value of Megatron local parameter `name` on this rank.

    `get(hf_name)` returns a full HF tensor; `layer_of(local_index)` maps a local layer
    index to its global (0-based) number, which differs from the local one under PP.
    """
    if name == "embedding.word_embeddings.weight":
        return rows(pad_vocab(get("model.embed_tokens.weight"), padded_vocab), tp_rank, tp)
    if name == "output_layer.weight":
        src = "model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight"
        return rows(pad_vocab(get(src), padded_vocab), tp_rank, tp)
    if name == "decoder.final_layernorm.weight":
        return get("model.norm.weight")
    parts = name.split(".")
    if parts[:2] != ["decoder", "layers"]:
        raise KeyError(f"no Hugging Face source for Megatron parameter {name!r}")
    prefix = f"model.layers.{layer_of(int(parts[2]))}."
    leaf = ".".join(parts[3:])
    if leaf == "input_layernorm.weight":
        return get(prefix + "input_layernorm.weight")
    if leaf == "pre_mlp_layernorm.weight":
        return get(prefix + "post_attention_layernorm.weight")
    if leaf == "self_attention.linear_qkv.weight":
        a = prefix + "self_attn."
        return interleave_qkv(get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight"), arch, tp_rank, tp)
    if leaf == "self_attention.linear_proj.weight":
        return cols(get(prefix + "self_attn.o_proj.weight"), tp_rank, tp)
    if leaf == "mlp.linear_fc1.weight":
        m = prefix + "mlp."
        return fc1_rows_of_rank(torch.cat([get(m + "gate_proj.weight"), get(m + "up_proj.weight")]), tp_rank, tp)
    if leaf == "mlp.linear_fc2.weight":
        return cols(get(prefix + "mlp.down_proj.weight"), tp_rank, tp)
    raise KeyError(f"no Hugging Face source for Megatron parameter {name!r}")
