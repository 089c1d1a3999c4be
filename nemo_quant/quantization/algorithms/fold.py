"""Folding the smoothing scales of o_proj and down_proj into the layers before them
(quant.search.fold_all_scales), so no layer keeps a `pre_quant_scale`.

Formats without a pre-quant-scale tensor (compressed-tensors, what vLLM's int4/int8 loaders
read) need every smoothing scale inside the weights, as AutoAWQ and llm-compressor do:
- linear_fc2 (down_proj) reads silu(gate) * up, linear in up's rows: up's row c is multiplied
  by s_c (gated MLPs only).
- linear_proj (o_proj) reads the attention output, linear in V: V's row j of KV group g is
  multiplied by s_j, which scales channel j of every query head of group g. So the scale must
  be one value per (group, j): candidates are tied across the query heads of a group (their
  geometric mean) *before* they are scored, and the search picks among foldable scales only.
Both earlier layers are column parallel (rows split over TP), so each rank scales its own rows;
the multiplier is built in TP=1's row order and cut by the layout rules of those layers.
Row scaling leaves per-row and per-row-block weight quantization unchanged (the amax scales
with the row), so folding costs those formats nothing. Layers must be visited fold-source
first (o_proj before linear_qkv, down_proj before linear_fc1): `fold_order` sorts them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nemo_quant.models.arch import LlamaArch, arch_of_config
from nemo_quant.models.megatron_layout import interleave_qkv


@dataclass
class FoldTarget:
    previous: nn.Module  # linear_qkv (V rows) or linear_fc1 (up rows)
    kind: str  # "v" or "up"
    arch: LlamaArch | None = None  # heads and KV groups of linear_qkv ("v" only)


def fold_problem(model: nn.Module, name: str) -> str | None:
    """Why the scale of `name` cannot be folded (None: it can, or it needs no fold)."""
    parent, _, leaf = name.rpartition(".")
    if leaf == "linear_fc2":
        fc1 = _sibling(model, parent, "linear_fc1")
        if fc1 is None or not bool(getattr(fc1.config, "gated_linear_unit", False)):
            return (f"{name}: quant.search.fold_all_scales needs a gated MLP (SwiGLU): a non-gated MLP's activation "
                    "sits between linear_fc1 and linear_fc2; set quant.search.fold_all_scales=false.")
    if leaf == "linear_proj" and _sibling(model, parent, "linear_qkv") is None:
        return f"{name}: quant.search.fold_all_scales needs the attention's linear_qkv next to it."
    return None


def fold_target(model: nn.Module, name: str) -> FoldTarget | None:
    """Where the smoothing scale of `name` folds (None for layers whose scale goes to a norm)."""
    parent, _, leaf = name.rpartition(".")
    if leaf == "linear_fc2":
        return FoldTarget(_sibling(model, parent, "linear_fc1"), "up")
    if leaf == "linear_proj":
        qkv = _sibling(model, parent, "linear_qkv")
        return FoldTarget(qkv, "v", arch_of_config(qkv.config))
    return None


def _sibling(model: nn.Module, parent: str, leaf: str) -> nn.Module | None:
    try:
        return model.get_submodule(f"{parent}.{leaf}")
    except AttributeError:
        return None


def tie(target: FoldTarget, scale: torch.Tensor) -> torch.Tensor:
    """A candidate scale made foldable: one value per (KV group, channel) for o_proj."""
    a = target.arch
    if target.kind != "v" or a.num_attention_heads == a.num_query_groups:
        return scale
    per_head = scale.reshape(a.num_query_groups, a.num_attention_heads // a.num_query_groups, a.head_dim)
    shared = per_head.log().mean(dim=1, keepdim=True).exp()
    return shared.expand_as(per_head).reshape(-1)


def tied_candidates(target: FoldTarget, candidates: list[tuple[float, torch.Tensor]]) -> list[tuple[float, torch.Tensor]]:
    return [(alpha, tie(target, s)) for alpha, s in candidates]


def _row_multiplier(target: FoldTarget, scale: torch.Tensor) -> torch.Tensor:
    """Multiplier of the earlier layer's rows in TP=1 order (see models/megatron_layout.py)."""
    if target.kind == "up":
        return torch.cat([torch.ones_like(scale), scale])
    a = target.arch
    d, groups = a.head_dim, a.num_query_groups
    v = scale.reshape(groups, -1, d)[:, 0].reshape(-1, 1)  # tied: every head of a group holds the same values
    q, k = torch.ones(a.num_attention_heads * d, 1), torch.ones(groups * d, 1)
    return interleave_qkv(q, k, v, a, 0, 1).reshape(-1)


def fold_into_previous(view, target: FoldTarget, scale: torch.Tensor) -> None:
    """Make `view`'s layer compute Q(x * scale) @ Q(W / scale)^T with x * scale produced by the
    earlier layer (its rows multiplied), instead of a pre-quant scale."""
    from nemo_quant.quantization.algorithms.linear_view import local_output_rows

    previous = target.previous
    wq = getattr(previous, "weight_quantizer", None)
    if wq is not None and wq.is_calibrated:
        # Its scales were decided on the unscaled rows: folding now would desynchronise them (a visiting-order bug).
        raise RuntimeError("fold_all_scales: the layer before this one is already calibrated; fold sources must be "
                           "visited first (fold_order)")
    local = local_output_rows(previous, _row_multiplier(target, scale.float()), gated=target.kind == "up")
    with torch.no_grad():
        view.write_weight(view.weight / scale)
        previous.weight.mul_(local.to(previous.weight.dtype).unsqueeze(1))


def fold_order(layers: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """Each fold source before the layer it folds into: linear_fc2 moves ahead of its linear_fc1
    (linear_proj already precedes linear_qkv in Megatron's module order; checked here)."""
    order = list(layers)
    position = {name: i for i, (name, _) in enumerate(order)}
    for name, _ in layers:
        parent, _, leaf = name.rpartition(".")
        into = {"linear_fc2": "linear_fc1", "linear_proj": "linear_qkv"}.get(leaf)
        if into is None or f"{parent}.{into}" not in position:
            continue
        i, j = position[name], position[f"{parent}.{into}"]
        if i > j:
            order.insert(j, order.pop(i))
            position = {n: k for k, (n, _) in enumerate(order)}
    return order
