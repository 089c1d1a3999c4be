"""An independent pure-torch Llama forward pass, used to check the Megatron import.

It deliberately shares nothing with the Megatron path: it reads tensors by GGUF name in
llama.cpp's own layout and applies RoPE to *adjacent pairs* (llama.cpp's convention), so a
mistake in our q/k un-permutation or QKV interleaving cannot cancel out.
"""
from __future__ import annotations

import torch

from nemo_quant.models.sources import GGUFSource, gguf_to_hf_name


class ReferenceLlama:
    def __init__(self, source: GGUFSource):
        self.arch = source.arch
        self.w = {t.name: source.get_raw(gguf_to_hf_name(t.name)) for t in source.reader.tensors}

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.arch.norm_eps) * weight

    def _rope_pairs(self, x: torch.Tensor) -> torch.Tensor:
        # x: [b, heads, s, d]; rotate (x[2i], x[2i+1]) by position * base^(-2i/d).
        b, h, s, d = x.shape
        inv = self.arch.rotary_base ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
        ang = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
        cos, sin = ang.cos().float(), ang.sin().float()
        pairs = x.reshape(b, h, s, d // 2, 2)
        x0, x1 = pairs[..., 0], pairs[..., 1]
        return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1).reshape(b, h, s, d)

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        a, w = self.arch, self.w
        b, s = tokens.shape
        d, nh, nkv = a.head_dim, a.num_attention_heads, a.num_query_groups
        x = w["token_embd.weight"][tokens]
        mask = torch.full((s, s), float("-inf")).triu(1)
        for i in range(a.num_layers):
            p = f"blk.{i}."
            h = self._rms(x, w[p + "attn_norm.weight"])
            q = (h @ w[p + "attn_q.weight"].T).view(b, s, nh, d).transpose(1, 2)
            k = (h @ w[p + "attn_k.weight"].T).view(b, s, nkv, d).transpose(1, 2)
            v = (h @ w[p + "attn_v.weight"].T).view(b, s, nkv, d).transpose(1, 2)
            q, k = self._rope_pairs(q), self._rope_pairs(k)
            k = k.repeat_interleave(nh // nkv, dim=1)
            v = v.repeat_interleave(nh // nkv, dim=1)
            att = torch.softmax(q @ k.transpose(-1, -2) / d**0.5 + mask, dim=-1)
            x = x + (att @ v).transpose(1, 2).reshape(b, s, nh * d) @ w[p + "attn_output.weight"].T
            h = self._rms(x, w[p + "ffn_norm.weight"])
            gate = torch.nn.functional.silu(h @ w[p + "ffn_gate.weight"].T)
            x = x + (gate * (h @ w[p + "ffn_up.weight"].T)) @ w[p + "ffn_down.weight"].T
        x = self._rms(x, w["output_norm.weight"])
        head = w.get("output.weight", w["token_embd.weight"])
        return x @ head.T

