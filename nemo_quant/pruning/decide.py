"""From importance scores and target sizes to a plan: which layers, channels, groups and heads stay.

A plan is plain JSON (it is saved in the mode state and replayed from checkpoints):
  sizes   {num_layers, hidden_size, num_attention_heads, num_query_groups, ffn_hidden_size}
  layers  kept decoder layers (global, ascending)
  hidden  kept embedding channels (ascending)
  ffn     per kept layer: kept FFN neurons (ascending)
  heads   per kept layer: kept query heads (global head index, ascending), whole groups' worth
  groups  per kept layer: kept KV groups (ascending)
Indices are ascending so the pruned model keeps the original order, which makes it equal to
slicing the weights by hand. GQA stays consistent: a head is kept only inside a kept group, and
every kept group keeps the same number of heads (those scoring highest within it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from nemo_quant.models.arch import LlamaArch
from nemo_quant.pruning.importance import Importance


@dataclass(frozen=True)
class Sizes:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int

    @classmethod
    def of(cls, arch: LlamaArch) -> "Sizes":
        return cls(arch.num_layers, arch.hidden_size, arch.num_attention_heads, arch.num_query_groups,
                   arch.ffn_hidden_size)

    def arch(self, base: LlamaArch) -> LlamaArch:
        from dataclasses import replace

        return replace(base, **asdict(self), kv_channels=base.head_dim)


def top_sorted(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, ascending; ties go to the lower index (stable)."""
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


def kept_heads(head_scores: torch.Tensor, groups: int, keep_groups: int, keep_heads: int) -> tuple[list[int], list[int]]:
    """Kept groups (by the sum of their heads' scores) and, inside each, the best heads."""
    per_group = head_scores.numel() // groups
    by_group = head_scores.reshape(groups, per_group)
    kept_groups = top_sorted(by_group.sum(1), keep_groups)
    heads_per_group = keep_heads // keep_groups
    heads = [g * per_group + h for g in kept_groups for h in top_sorted(by_group[g], heads_per_group)]
    return kept_groups, heads


def make_plan(importance: Importance, sizes: Sizes, groups: int, layers: list[int] | None = None) -> dict:
    """`groups`: the model's KV groups now; `layers`: the kept layers when chosen elsewhere
    (skip-loss), else those of highest block influence."""
    if layers is None:
        layers = top_sorted(importance.layers, sizes.num_layers)
    chosen = [kept_heads(importance.heads[i], groups, sizes.num_query_groups, sizes.num_attention_heads)
              for i in layers]
    return {
        "sizes": asdict(sizes),
        "layers": list(layers),
        "hidden": top_sorted(importance.hidden, sizes.hidden_size),
        "ffn": [top_sorted(importance.neurons[i], sizes.ffn_hidden_size) for i in layers],
        "heads": [heads for _, heads in chosen],
        "groups": [kept for kept, _ in chosen],
    }
