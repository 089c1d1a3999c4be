"""The `prune` mode: Minitron width (FFN, heads, KV groups, embedding channels) and depth pruning.

`apply` only checks and records; the data step measures importance on the calibration windows,
chooses the sizes (explicit, or searched for `target.params`), shrinks the model in place and
stores the plan in the mode state. Replaying a saved state applies the stored plan to a freshly
built model (or nothing, when it was built from the pruned architecture already).
"""
from __future__ import annotations

import time
from dataclasses import asdict

from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.models.arch import arch_of_config
from nemo_quant.models.builder import true_vocab_size
from nemo_quant.modes import Mode, record_decision, register_mode
from nemo_quant.pruning.config import LayerScore, PruneConfig
from nemo_quant.pruning.decide import Sizes, make_plan
from nemo_quant.pruning.surgery import apply_plan, is_applied, parallel_sizes
from nemo_quant.runtime.distributed_init import is_main_rank

DIMENSIONS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")


def validate_prune_config(cfg: PruneConfig) -> None:
    t, s = cfg.target, cfg.search
    if cfg.plan is not None:
        return
    if all(getattr(t, k) is None for k in (*DIMENSIONS, "params")):
        raise ConfigError("prune.target sets nothing to prune: set prune.target.<dimension> (ffn_hidden_size, "
                          "num_attention_heads, num_query_groups, hidden_size, num_layers) or prune.target.params.")
    for key in DIMENSIONS:
        value = getattr(t, key)
        if value is not None and value < 1:
            raise ConfigError(f"prune.target.{key}={value}: must be >= 1.")
    if t.params is not None and t.params <= 0:
        raise ConfigError(f"prune.target.params={t.params}: must be a positive parameter count (e.g. 100e6).")
    if not 0 < s.tolerance < 1 or s.candidates < 1 or s.windows < 1 or s.ffn_step < 1 or s.hidden_step < 1:
        raise ConfigError("prune.search: tolerance must be in (0, 1); candidates, windows, ffn_step and hidden_step >= 1.")
    if not 0 < s.min_fraction <= 1:
        raise ConfigError(f"prune.search.min_fraction={s.min_fraction}: must be in (0, 1].")
    if cfg.skip_loss_windows < 1:
        raise ConfigError(f"prune.skip_loss_windows={cfg.skip_loss_windows}: must be >= 1.")


def explicit_sizes(model: nn.Module, cfg: PruneConfig) -> Sizes:
    """The sizes the explicit targets ask for (unset ones kept), every rule checked; raises ConfigError."""
    c, t = model.config, cfg.target
    tp, pp = parallel_sizes()
    groups, heads = c.num_query_groups or c.num_attention_heads, c.num_attention_heads
    per_group = heads // groups
    new_groups = t.num_query_groups or groups
    new_heads = t.num_attention_heads or (new_groups * per_group if t.num_query_groups else heads)
    sizes = Sizes(t.num_layers or c.num_layers, t.hidden_size or c.hidden_size, new_heads, new_groups,
                  t.ffn_hidden_size or c.ffn_hidden_size)
    have = Sizes(c.num_layers, c.hidden_size, heads, groups, c.ffn_hidden_size)
    for key in DIMENSIONS:
        if getattr(sizes, key) > getattr(have, key):
            raise ConfigError(f"prune.target.{key}={getattr(sizes, key)} exceeds the model's {getattr(have, key)}; "
                              "pruning only shrinks.")
    if new_heads % new_groups or new_heads // new_groups > per_group:
        raise ConfigError(
            f"prune.target.num_attention_heads={new_heads} breaks GQA with {new_groups} KV groups: keep a multiple of "
            f"prune.target.num_query_groups (or of the model's {groups} groups) with at most {per_group} heads per "
            f"group, e.g. {new_groups * max(1, min(per_group, new_heads // new_groups))}.")
    for key in ("ffn_hidden_size", "num_attention_heads", "num_query_groups"):
        if getattr(sizes, key) % tp:
            raise ConfigError(f"prune.target.{key}={getattr(sizes, key)} is not divisible by parallel.tp={tp}; pick a "
                              f"multiple of {tp}.")
    if sizes.num_layers % pp:
        raise ConfigError(f"prune.target.num_layers={sizes.num_layers} is not divisible by parallel.pp={pp}; pick a "
                          f"multiple of {pp}.")
    return sizes


def _check(model: nn.Module, cfg: PruneConfig) -> None:
    if cfg.plan is not None:
        return
    sizes = explicit_sizes(model, cfg)
    if sizes.hidden_size % sizes.num_attention_heads and is_main_rank():
        print(f"[nemo_quant] warning: prune.target gives hidden_size={sizes.hidden_size} with "
              f"{sizes.num_attention_heads} heads: transformers' LlamaConfig refuses a hidden size that is not a "
              "multiple of the head count (even with head_dim), so its HF export loads in vLLM / TensorRT-LLM "
              "but not in transformers.", flush=True)
    if cfg.target.params is not None:
        arch = arch_of_config(model.config, true_vocab_size(model), tie_word_embeddings=bool(
            model.share_embeddings_and_output_weights))
        if cfg.target.params >= arch.parameter_count():
            raise ConfigError(f"prune.target.params={cfg.target.params:.4g} is not below the model's "
                              f"{arch.parameter_count():,} parameters; nothing to prune.")
        from nemo_quant.pruning.search import sizes_within_budget

        sizes_within_budget(arch, cfg, *parallel_sizes())


def _apply(model: nn.Module, cfg: PruneConfig) -> None:
    if cfg.plan is None:
        if is_main_rank():
            print("[nemo_quant] prune: sizes and kept channels are chosen by the calibration pass", flush=True)
        return
    if not is_applied(model, cfg.plan):
        apply_plan(model, cfg.plan)


def prune(model: nn.Module, forward_loop) -> dict:
    """The data step: importance -> sizes -> plan -> surgery; returns a report."""
    from nemo_quant.models.arch import LlamaArch
    from nemo_quant.modes import mode_config
    from nemo_quant.pruning.importance import measure_importance
    from nemo_quant.pruning.search import iterative_skip_scores, search_sizes, skip_losses

    cfg = mode_config(model, "prune")
    if cfg.plan is not None:
        return {"replayed": True}
    start = time.perf_counter()
    before: LlamaArch = arch_of_config(model.config, true_vocab_size(model),
                                       tie_word_embeddings=bool(model.share_embeddings_and_output_weights))
    windows = getattr(forward_loop, "windows", None)
    # layer scores by the loss only when the depth may change
    layer_score = LayerScore(cfg.layer_score) if min(allowed_depths(model, cfg)) < before.num_layers else None
    needs_windows = layer_score not in (None, LayerScore.block_influence) or cfg.target.params is not None
    if needs_windows and windows is None:
        raise ConfigError("prune.layer_score=skip_loss / iterative_skip_loss and prune.target.params score by the loss, "
                          "which needs the calibration windows: pass a loop from windows_forward_loop(...).")
    imp = measure_importance(model, forward_loop, cfg.channel_score)
    if layer_score == LayerScore.skip_loss:
        imp.layers = skip_losses(model, windows[: cfg.skip_loss_windows])
    elif layer_score == LayerScore.iterative_skip_loss:
        keep = min(allowed_depths(model, cfg))
        imp.layers = iterative_skip_scores(model, windows[: cfg.skip_loss_windows], keep)
    searched = None
    if cfg.target.params is not None:
        sizes, searched = search_sizes(model, before, cfg, imp, windows)
    else:
        sizes = explicit_sizes(model, cfg)
    plan = make_plan(imp, sizes, before.num_query_groups)
    apply_plan(model, plan)
    record_decision(model, "prune", "plan", plan)
    after = sizes.arch(before)
    report = {"sizes": asdict(sizes), "params_before": before.parameter_count(), "params_after": after.parameter_count(),
              "seconds": time.perf_counter() - start,
              "searched": [{"sizes": asdict(c.sizes), "params": c.params, "loss": c.loss} for c in searched or []]}
    if is_main_rank():
        print(f"[nemo_quant] pruned {before.parameter_count():,} -> {after.parameter_count():,} parameters: "
              f"{asdict(sizes)} in {report['seconds']:.1f} s", flush=True)
    return report


def allowed_depths(model: nn.Module, cfg: PruneConfig) -> list[int]:
    """The layer counts the pruning may end with (the explicit target, or the search's range)."""
    if cfg.target.params is None:
        return [explicit_sizes(model, cfg).num_layers]
    from nemo_quant.pruning.search import allowed_sizes

    arch = arch_of_config(model.config, true_vocab_size(model))
    return allowed_sizes(arch, cfg, *parallel_sizes())["num_layers"]


def _loaded_problem(model: nn.Module, cfg: PruneConfig) -> str | None:
    if cfg.plan is not None and not is_applied(model, cfg.plan):
        return "the model's shapes differ from the prune plan its checkpoint records"
    return None


PRUNE = register_mode(Mode(
    name="prune",
    config_class=PruneConfig,
    apply=_apply,
    may_follow=frozenset(),
    validate=validate_prune_config,
    check=_check,
    data_step=prune,
    loaded_problem=_loaded_problem,
    decisions=frozenset({"plan"}),
))
