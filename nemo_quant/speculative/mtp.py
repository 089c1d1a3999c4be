"""MTP: megatron-core's own `MultiTokenPredictionLayer` (DeepSeek-V3 multi-token prediction,
local spec) on the frozen base: eh_proj(cat(enorm(e(x[p+1])), hnorm(h[p]))) -> a decoder layer
built from the base's layer spec -> final norm -> the base's output layer, predicting x[p+2].
Chained drafts reuse the layer on its own (post-norm) output, as engines chain one MTP module."""
from __future__ import annotations

import torch

from nemo_quant.speculative.base_view import BaseView
from nemo_quant.speculative.draft_module import DraftModule
from nemo_quant.speculative.unroll import run_unrolled



class MTPDraft(DraftModule):
    aux_layers: list[int] = []
    uses_base_logits = False

    def __init__(self, config, layer_spec, max_steps: int):
        super().__init__(config)
        from megatron.core.process_groups_config import ProcessGroupCollection
        from megatron.core.transformer.multi_token_prediction import get_mtp_layer_spec
        from megatron.core.transformer.spec_utils import build_module

        self.max_steps = max_steps
        self.mtp = build_module(get_mtp_layer_spec(layer_spec, use_transformer_engine=False), config=config,
                                layer_number=1, pg_collection=ProcessGroupCollection.use_mpu_process_groups(
                                    required_pgs=["cp"]))

    def draft_logits(self, view: BaseView, steps: int, next_tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        embeds = view.step_embeds(steps, next_tokens)

        def layer_fn(hidden, emb, mask):
            x = self.mtp._concat_embeddings(hidden, emb)
            x, _ = self.mtp.transformer_layer(hidden_states=x, attention_mask=mask,
                                              rotary_pos_emb=view.block_rotary(hidden.shape[0]))
            return self.mtp._postprocess(x)

        outputs = run_unrolled(layer_fn, view.hidden, embeds, steps)
        return [view.base_logits(out) for out in outputs]
