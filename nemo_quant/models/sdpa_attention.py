"""Core attention through PyTorch's `scaled_dot_product_attention`, registered in the layer spec
in place of megatron-core's local `DotProductAttention`.

Megatron's local core attention materialises the [b*heads, s, s] scores with baddbmm, builds a
causal mask on every call, runs a separate masked softmax and repeats K/V for grouped queries;
on CPU that is most of the gap to Hugging Face's Llama. SDPA does the same maths in one fused
kernel (flash attention on CPU and GPU), causal without a mask tensor, grouped queries without
copies. Same interface, same module name (`core_attention`), no parameters, so checkpoints and
the KV-cache quantizers are unaffected. Features SDPA cannot express here (a learnable or
off-by-one softmax offset, window attention, query-key layer scaling) keep Megatron's path.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPADotProductAttention(DotProductAttention):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        c = self.config
        self._sdpa = (self.softmax_offset is None and not c.apply_query_key_layer_scaling
                      and self.scale_mask_softmax.window_size is None)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if not self._sdpa or packed_seq_params is not None or attention_bias is not None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        # Megatron lays q/k/v out as [s, b, heads, d]; SDPA wants [b, heads, s, d].
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        causal = attention_mask is None and mask_type == AttnMaskType.causal and q.size(2) > 1
        # Megatron's masks mark the positions to drop (True = masked); SDPA's mark those to keep.
        mask = None if attention_mask is None else ~attention_mask
        dropout = self.attention_dropout.p if self.training else 0.0
        grouped = q.size(1) != k.size(1)
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout else nullcontext():
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal,
                                                     scale=self.softmax_scale, enable_gqa=grouped)
        # [b, heads, s, d] -> [s, b, heads * d]
        return context.permute(2, 0, 1, 3).reshape(context.size(2), context.size(0), self.hidden_size_per_partition)
