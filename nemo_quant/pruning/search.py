"""Sizes for a parameter budget (`prune.target.params`) and skip-loss layer importance.

The search lists every allowed architecture (explicit targets fixed; the rest on the steps of
`prune.search`, every TP/PP/GQA rule kept) whose parameter count lies within `tolerance` below
the budget, ranks them by the share of importance they drop, and scores the best `candidates`
(at least one per combination of shrunk dimensions, so depth is weighed against width) by their
calibration loss seen through the masked view. The least loss wins.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass

import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.models.arch import LlamaArch
from nemo_quant.pruning.config import PruneConfig
from nemo_quant.pruning.decide import Sizes, kept_heads, make_plan, top_sorted
from nemo_quant.pruning.importance import Importance
from nemo_quant.pruning.masked_view import identity_plan, masked_loss
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.utils.progress import progress


class SearchError(ConfigError):
    pass


def _steps(full: int, step: int, floor: int) -> list[int]:
    values = {v for v in range(step, full + 1, step) if v >= floor}
    return sorted(values | {full})


def allowed_sizes(arch: LlamaArch, cfg: PruneConfig, tp: int, pp: int) -> dict[str, list]:
    """Every value each dimension may take (a fixed target is its only value)."""
    t, s = cfg.target, cfg.search
    floor = lambda full: math.ceil(full * s.min_fraction)  # noqa: E731
    ffn_step = math.lcm(s.ffn_step, tp)
    per_group = arch.num_attention_heads // arch.num_query_groups
    groups = [g for g in range(tp, arch.num_query_groups + 1, tp)]
    attention = [(g, g * p) for g in groups for p in range(1, per_group + 1)
                 if g * p >= floor(arch.num_attention_heads)]
    if t.num_query_groups is not None or t.num_attention_heads is not None:
        attention = [(g, h) for g, h in attention if t.num_query_groups in (None, g) and t.num_attention_heads in (None, h)]
    return {
        "num_layers": [t.num_layers] if t.num_layers else [n for n in range(pp, arch.num_layers + 1, pp)
                                                         if n >= floor(arch.num_layers)],
        "hidden_size": [t.hidden_size] if t.hidden_size else _steps(arch.hidden_size, s.hidden_step,
                                                                    floor(arch.hidden_size)),
        "ffn_hidden_size": [t.ffn_hidden_size] if t.ffn_hidden_size else _steps(arch.ffn_hidden_size, ffn_step,
                                                                                floor(arch.ffn_hidden_size)),
        "attention": attention,
    }


@dataclass
class Candidate:
    sizes: Sizes
    params: int
    dropped: float  # share of importance the candidate drops, summed over dimensions
    loss: float | None = None


def _kept_share(scores: torch.Tensor, k: int) -> float:
    total = float(scores.sum())
    return float(scores[top_sorted(scores, k)].sum()) / total if total > 0 else k / scores.numel()


def _dropped(imp: Importance, sizes: Sizes, groups: int) -> float:
    layers = top_sorted(imp.layers, sizes.num_layers)
    ffn = sum(_kept_share(imp.neurons[i], sizes.ffn_hidden_size) for i in layers) / len(layers)
    heads = 0.0
    for i in layers:
        _, kept = kept_heads(imp.heads[i], groups, sizes.num_query_groups, sizes.num_attention_heads)
        heads += float(imp.heads[i][kept].sum() / imp.heads[i].sum().clamp(min=1e-30))
    return (4 - _kept_share(imp.layers, sizes.num_layers) - _kept_share(imp.hidden, sizes.hidden_size)
            - ffn - heads / len(layers))


def sizes_within_budget(arch: LlamaArch, cfg: PruneConfig, tp: int, pp: int) -> list[tuple[Sizes, int]]:
    """Every allowed size within `tolerance` below `target.params`, with its parameter count; raises
    (before any work) when there is none."""
    budget, tolerance = cfg.target.params, cfg.search.tolerance
    space = allowed_sizes(arch, cfg, tp, pp)
    every = [(Sizes(layers, hidden, heads, groups, ffn)) for layers, hidden, ffn, (groups, heads) in itertools.product(
        space["num_layers"], space["hidden_size"], space["ffn_hidden_size"], space["attention"])
        if not cfg.search.transformers_loadable or hidden % heads == 0]
    counted = [(sizes, sizes.arch(arch).parameter_count()) for sizes in every]
    found = [(sizes, params) for sizes, params in counted if budget * (1 - tolerance) <= params <= budget]
    if not found:
        smallest = min(params for _, params in counted)
        raise SearchError(
            f"prune.target.params={budget:.4g}: no allowed size lands within prune.search.tolerance={tolerance} below "
            f"it (the model has {arch.parameter_count():,} parameters; the smallest allowed size has {smallest:,}); "
            "raise the budget or prune.search.tolerance, or lower prune.search.min_fraction / the search steps.")
    return found


def candidates(arch: LlamaArch, cfg: PruneConfig, imp: Importance, tp: int, pp: int) -> list[Candidate]:
    found = [Candidate(sizes, params, _dropped(imp, sizes, arch.num_query_groups))
             for sizes, params in sizes_within_budget(arch, cfg, tp, pp)]
    found.sort(key=lambda c: c.dropped)
    return found


def shortlist(found: list[Candidate], base: Sizes, count: int) -> list[Candidate]:
    """The best candidate of each combination of shrunk dimensions, then the next best overall."""
    def shape(c: Candidate) -> tuple:
        return tuple(a != b for a, b in zip(asdict(c.sizes).values(), asdict(base).values()))

    picked, seen = [], set()
    for c in found:
        if shape(c) not in seen:
            seen.add(shape(c))
            picked.append(c)
    picked = picked[:count]
    picked += [c for c in found if c not in picked][: max(0, count - len(picked))]
    return picked


def search_sizes(model, arch: LlamaArch, cfg: PruneConfig, imp: Importance,
                 windows: torch.Tensor) -> tuple[Sizes, list[Candidate]]:
    from nemo_quant.pruning.surgery import parallel_sizes

    tp, pp = parallel_sizes()
    found = shortlist(candidates(arch, cfg, imp, tp, pp), Sizes.of(arch), cfg.search.candidates)
    for c in found:
        plan = make_plan(imp, c.sizes, arch.num_query_groups)
        c.loss = masked_loss(model, plan, windows[: cfg.search.windows])
        if is_main_rank():
            print(f"[nemo_quant] prune search: {asdict(c.sizes)} params {c.params:,} loss {c.loss:.4f}", flush=True)
    best = min(found, key=lambda c: c.loss)
    return best.sizes, found


def skip_losses(model, windows: torch.Tensor) -> torch.Tensor:
    """Calibration loss with each layer skipped in turn (higher = the layer matters more)."""
    losses = torch.zeros(model.config.num_layers)
    bar = progress(total=model.config.num_layers, desc="prune: skip-loss", unit="layer")
    for g in range(model.config.num_layers):
        losses[g] = masked_loss(model, identity_plan(model.config, skip=(g,)), windows)
        bar.update(1)
    bar.close()
    return losses


def iterative_skip_scores(model, windows: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy depth pruning down to `keep` layers: each round drops the layer whose skipping (with
    the earlier rounds' layers skipped too) gives the least calibration loss. Scores: the round a
    layer was dropped in (first dropped lowest), the kept layers above every dropped one."""
    total = model.config.num_layers
    dropped: list[int] = []
    bar = progress(total=sum(total - i for i in range(total - keep)), desc="prune: iterative skip-loss", unit="pass")
    while len(dropped) < total - keep:
        losses = {}
        for g in (g for g in range(total) if g not in dropped):
            losses[g] = masked_loss(model, identity_plan(model.config, skip=(*dropped, g)), windows)
            bar.update(1)
        dropped.append(min(losses, key=lambda g: (losses[g], g)))
    bar.close()
    scores = torch.full((total,), float(total))
    for round_, g in enumerate(dropped):
        scores[g] = round_
    return scores
