"""EAGLE-3 and EAGLE-1 drafts (one decoder layer on the base's features).

EAGLE-3: fc fuses the outputs of the aux layers (low, mid, high) into one feature g[p]; the layer
reads [input_layernorm(e(x[p+1])), hidden_norm(g[p])]; norm -> its own head (full or reduced
draft vocabulary, `draft_ids` maps draft ids to the base's). The next step reads the layer's
pre-norm output as its feature.
EAGLE-1: fc(cat(e(x[p+1]), f[p])) with f the base's last (post-norm) hidden state; the layer
predicts the next feature, which the base's own output layer turns into logits.
"""
from __future__ import annotations

import torch

from nemo_quant.speculative.base_view import BaseView
from nemo_quant.speculative.draft_module import DraftModule
from nemo_quant.speculative.draft_layer import DraftDecoderLayer, column
from nemo_quant.speculative.unroll import run_unrolled


class EagleDraft(DraftModule):
    uses_base_logits = True

    def __init__(self, config, version: int, aux_layers: list[int], padded_draft_vocab: int | None,
                 base_head: torch.Tensor | None, draft_ids: torch.Tensor | None, max_steps: int):
        super().__init__(config)
        h = config.hidden_size
        self.version, self.max_steps = version, max_steps
        if version == 3:
            self.aux_layers = list(aux_layers)
            self.fc = column(config, len(aux_layers) * h, h, gather=True)
            self.layer = DraftDecoderLayer(config, 2 * h, split_input_norms=True)
            self.norm = torch.nn.RMSNorm(h, eps=config.layernorm_epsilon)
            self.lm_head = column(config, h, padded_draft_vocab)
            with torch.no_grad():
                self.lm_head.weight.copy_(base_head)
            self.register_buffer("draft_ids", draft_ids.clone() if draft_ids is not None else None)
        else:
            self.aux_layers = []
            self.fc = column(config, 2 * h, h, bias=True, gather=True)
            self.layer = DraftDecoderLayer(config, h, split_input_norms=False)

    def draft_logits(self, view: BaseView, steps: int, next_tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Vocab-parallel logits [s, b, V/tp] of steps 0..steps-1 (see unroll.py for the rows)."""
        embeds = view.step_embeds(steps, next_tokens)

        def layer_fn(hidden, emb, mask):
            return self.layer(hidden, emb if self.version == 3 else None, mask, view.block_rotary(hidden.shape[0]))

        if self.version == 3:
            first = self.fc(torch.cat([view.aux[i] for i in self.aux_layers], dim=-1))[0]
            outputs = run_unrolled(layer_fn, first, embeds, steps)
            return [self.lm_head(self.norm(out))[0] for out in outputs]

        def eagle1_layer(hidden, emb, mask):  # EAGLE-1 fuses the token into the feature before the layer
            return layer_fn(self.fc(torch.cat([emb, hidden], dim=-1))[0], None, mask)

        outputs = run_unrolled(eagle1_layer, view.hidden, embeds, steps)
        return [view.base_logits(out) for out in outputs]
