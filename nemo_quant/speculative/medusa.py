"""Medusa heads: head i reads the base's last hidden state at position p and predicts x[p+2+i].

Each head is `head_layers` residual blocks (x + SiLU(W x + b), W column-parallel and gathered,
zero-initialised so a fresh head equals the base's head) and its own vocab-parallel projection,
initialised from the base's output layer shard (as Medusa does)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from nemo_quant.speculative.base_view import BaseView
from nemo_quant.speculative.draft_layer import column
from nemo_quant.speculative.draft_module import DraftModule


class ResBlock(MegatronModule):
    def __init__(self, config):
        super().__init__(config)
        self.linear = column(config, config.hidden_size, config.hidden_size, bias=True, gather=True)
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.zero_()

    def forward(self, x):
        return x + F.silu(self.linear(x)[0])


class MedusaHead(DraftModule):
    module_lists = ("blocks",)

    def __init__(self, config, layers: int, vocab: int, base_head: torch.Tensor):
        super().__init__(config)
        self.blocks = torch.nn.ModuleList(ResBlock(config) for _ in range(layers))
        self.lm_head = column(config, config.hidden_size, vocab)
        with torch.no_grad():
            self.lm_head.weight.copy_(base_head)

    def forward(self, hidden):
        for block in self.blocks:
            hidden = block(hidden)
        return self.lm_head(hidden)[0]


class MedusaHeads(DraftModule):
    module_lists = ("heads",)
    aux_layers: list[int] = []
    uses_base_logits = False

    def __init__(self, config, num_heads: int, layers: int, padded_vocab: int, base_head: torch.Tensor):
        super().__init__(config)
        self.heads = torch.nn.ModuleList(MedusaHead(config, layers, padded_vocab, base_head) for _ in range(num_heads))

    @property
    def max_steps(self) -> int:
        return len(self.heads)

    def draft_logits(self, view: BaseView, steps: int, next_tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Step s at row p: head s on the hidden state of row p - s (the chain's verified position)."""
        from nemo_quant.speculative.unroll import shift_down

        outputs = []
        for s in range(steps):
            hidden = view.hidden
            for _ in range(s):
                hidden = shift_down(hidden)
            outputs.append(self.heads[s](hidden))
        return outputs
