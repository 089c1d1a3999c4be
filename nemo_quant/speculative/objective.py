"""The heads' training objective for the one training loop: a frozen base forward (no graph),
then the draft's weighted loss (losses.py). The base's parameters are frozen by the mode, so
only the draft's gradients exist."""
from __future__ import annotations

import torch
from torch import nn

from nemo_quant.speculative.base_view import base_view
from nemo_quant.speculative.config import Method, SpeculativeConfig
from nemo_quant.speculative.losses import draft_loss


class SpeculativeObjective:
    def __init__(self, model: nn.Module, cfg: SpeculativeConfig, true_vocab: int):
        from nemo_quant.speculative.mode import ATTR

        self.draft = getattr(model, ATTR)
        self.cfg, self.true_vocab = cfg, true_vocab
        method = Method(cfg.method)
        self.steps = min(cfg.num_heads, self.draft.max_steps) if method == Method.medusa else cfg.ttt_steps
        self.last_accuracy: list[float] = []

    def begin_step(self, micro_batches: list[torch.Tensor]) -> None:
        pass

    def end_step(self) -> None:
        pass

    def forward(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor):
        view = base_view(model, tokens, self.draft.aux_layers)
        loss, self.last_accuracy = draft_loss(self.draft, view, self.steps, self.cfg.step_decay, self.cfg.loss_weight,
                                              self.true_vocab)

        def loss_func(output):
            return output, {"loss": output.detach().clone(), "top1": torch.tensor(self.last_accuracy[0])}

        return loss, loss_func
