"""One frozen forward of the base: what every draft reads (final hidden state, EAGLE-3's layer
outputs, the base's vocab-parallel logits, its embedding and rotary frequencies)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nemo_quant.runtime.pipeline import position_ids_for


@dataclass
class BaseView:
    tokens: torch.Tensor  # [b, s]
    hidden: torch.Tensor  # [s, b, h] the final norm's output (the output layer's input)
    logits: torch.Tensor  # [b, s, V/tp] vocab-parallel
    aux: dict[int, torch.Tensor] = field(default_factory=dict)  # global layer -> its output [s, b, h]
    model: nn.Module | None = None

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings [s, b, h] of `tokens` [b, s] (the base's frozen table)."""
        with torch.no_grad():
            return self.model.embedding(input_ids=tokens, position_ids=position_ids_for(tokens))

    def base_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base's (frozen) output layer on a draft's hidden states: [s, b, V/tp]."""
        return self.model.output_layer(hidden, weight=base_head_weight(self.model))[0]

    def rotary(self, seq: int) -> torch.Tensor:
        return self.model.rotary_pos_emb(seq)

    def next_tokens(self) -> torch.Tensor:
        """x[p+1] at row p (the last row repeats a token; it has no target)."""
        return torch.cat([self.tokens[:, 1:], self.tokens[:, -1:]], dim=1)

    def step_embeds(self, steps: int, next_tokens: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """What each unrolled draft step consumes: x[p+1] at row p, or the caller's own tokens."""
        return [self.embed(t) for t in (next_tokens or [self.next_tokens()] * steps)]

    def block_rotary(self, rows: int) -> torch.Tensor:
        """Rotary frequencies for `rows` = n concatenated unroll blocks (each block restarts at 0)."""
        seq = self.hidden.shape[0]
        return torch.cat([self.rotary(seq)] * (rows // seq), 0)


def base_head_weight(model: nn.Module) -> torch.Tensor:
    """This rank's vocab-parallel output weight (the embedding's when they are tied)."""
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def base_view(model: nn.Module, tokens: torch.Tensor, aux_layers: list[int] = ()) -> BaseView:
    """Run the frozen base on `tokens` [b, s] (PP=1), capturing the needed hidden states."""
    aux: dict[int, torch.Tensor] = {}
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for layer in model.decoder.layers:
        index = layer.layer_number - 1
        if index in aux_layers:
            hooks.append(layer.register_forward_hook(
                lambda m, a, out, i=index: aux.__setitem__(i, out[0] if isinstance(out, tuple) else out)))
    hooks.append(model.decoder.register_forward_hook(  # the block's output is after its final norm
        lambda m, args, out: captured.__setitem__("hidden", out[0] if isinstance(out, tuple) else out)))
    try:
        with torch.no_grad():
            logits = model(tokens, position_ids_for(tokens), None)
    finally:
        for h in hooks:
            h.remove()
    return BaseView(tokens=tokens, hidden=captured["hidden"], logits=logits, aux=aux, model=model)
