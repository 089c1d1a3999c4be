"""The EAGLE draft decoder layer, TP-sharded like the base (q/k/v/gate/up column-parallel by heads
and channels, o/down row-parallel), laid out as the engines name it (q_proj, ..., down_proj).

EAGLE-3's layer reads [input_layernorm(embedding), hidden_norm(feature)] (2h inputs to q/k/v)
with the feature as its residual; EAGLE-1's reads one fused h-wide input. Attention takes an
arbitrary mask (the training-time-test blocks) and the base's rotary frequencies per row.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


def column(config, inputs: int, outputs: int, bias: bool = False, gather: bool = False):
    from megatron.core.tensor_parallel import ColumnParallelLinear

    return ColumnParallelLinear(inputs, outputs, config=config, init_method=config.init_method, bias=bias,
                                gather_output=gather)


def row(config, inputs: int, outputs: int):
    from megatron.core.tensor_parallel import RowParallelLinear

    return RowParallelLinear(inputs, outputs, config=config, init_method=config.output_layer_init_method, bias=False,
                             input_is_parallel=True, skip_bias_add=False)


class DraftDecoderLayer(MegatronModule):
    def __init__(self, config, input_size: int, split_input_norms: bool):
        super().__init__(config)
        from megatron.core import parallel_state as ps

        h, d = config.hidden_size, config.kv_channels
        tp = ps.get_tensor_model_parallel_world_size()
        self.heads, self.groups = config.num_attention_heads // tp, config.num_query_groups // tp
        self.head_dim = d
        self.split_input_norms = split_input_norms
        if split_input_norms:
            self.input_layernorm = torch.nn.RMSNorm(h, eps=config.layernorm_epsilon)
            self.hidden_norm = torch.nn.RMSNorm(h, eps=config.layernorm_epsilon)
        self.q_proj = column(config, input_size, config.num_attention_heads * d)
        self.k_proj = column(config, input_size, config.num_query_groups * d)
        self.v_proj = column(config, input_size, config.num_query_groups * d)
        self.o_proj = row(config, config.num_attention_heads * d, h)
        self.post_attention_layernorm = torch.nn.RMSNorm(h, eps=config.layernorm_epsilon)
        self.gate_proj = column(config, h, config.ffn_hidden_size)
        self.up_proj = column(config, h, config.ffn_hidden_size)
        self.down_proj = row(config, config.ffn_hidden_size, h)

    def forward(self, hidden: torch.Tensor, embeds: torch.Tensor | None, mask: torch.Tensor,
                rotary: torch.Tensor) -> torch.Tensor:
        """[s, b, *] -> [s, b, h] (the pre-norm output: residual stream after attention and MLP)."""
        from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

        if self.split_input_norms:
            residual = hidden
            x = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        else:
            residual = x = hidden
        s, b = x.shape[:2]
        q = self.q_proj(x)[0].view(s, b, self.heads, self.head_dim)
        k = self.k_proj(x)[0].view(s, b, self.groups, self.head_dim)
        v = self.v_proj(x)[0].view(s, b, self.groups, self.head_dim)
        q, k = (apply_rotary_pos_emb(t, rotary, self.config) for t in (q, k))
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        context = F.scaled_dot_product_attention(q, k, v, attn_mask=~mask, enable_gqa=self.heads != self.groups)
        context = context.permute(2, 0, 1, 3).reshape(s, b, self.heads * self.head_dim)
        hidden = residual + self.o_proj(context)[0]
        x = self.post_attention_layernorm(hidden)
        return hidden + self.down_proj(F.silu(self.gate_proj(x)[0]) * self.up_proj(x)[0])[0]
