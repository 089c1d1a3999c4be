"""The `sparsity` mode: n:m masks on the decoder's linear layers (apply = convert; the masks
are chosen by `sparsify`, or loaded from a checkpoint)."""
from __future__ import annotations

from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.mode_patterns import hits_on_all_ranks, linear_tp_axes
from nemo_quant.modes import Mode, register_mode
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.sparsity.config import SparsityConfig, SparsityMethod
from nemo_quant.models.gemm_operands import megatron_type
from nemo_quant.sparsity.modules import convert_to_sparse, plan_sparsity


def validate_sparsity_config(cfg: SparsityConfig) -> None:
    if not 1 <= cfg.m <= 64:
        raise ConfigError(f"sparsity.m={cfg.m}: must be between 1 and 64 (2:4 and 4:8 are what GPUs accelerate).")
    if not 0 < cfg.n < cfg.m:
        raise ConfigError(f"sparsity.n={cfg.n}: must be between 1 and sparsity.m - 1 = {cfg.m - 1}.")
    if cfg.damp < 0:
        raise ConfigError(f"sparsity.damp={cfg.damp}: must be >= 0.")
    if cfg.block_size < cfg.m or cfg.block_size % cfg.m:
        raise ConfigError(f"sparsity.block_size={cfg.block_size}: must be a positive multiple of sparsity.m={cfg.m}.")
    a = cfg.admm
    if a.iterations < 0 or a.refit_iterations < 0:
        raise ConfigError("sparsity.admm.iterations and sparsity.admm.refit_iterations must be >= 0.")
    if a.rho_start <= 0 or a.rho_growth < 1:
        raise ConfigError(f"sparsity.admm.rho_start={a.rho_start} must be > 0 and sparsity.admm.rho_growth="
                          f"{a.rho_growth} >= 1.")
    SparsityMethod(cfg.method)


def _check(model: nn.Module, cfg: SparsityConfig) -> None:
    """Shape rules on every rank; exclude patterns must match somewhere in the pipeline."""
    def plan() -> list[int]:
        p = plan_sparsity(model, cfg)
        return [*p.exclude_hits, len(p.layers)]

    counts = hits_on_all_ranks(plan, len(cfg.exclude) + 1)
    for i, pattern in enumerate(cfg.exclude):
        if counts[i] == 0:
            raise ConfigError(f"sparsity.exclude[{i}]={pattern!r} matches no linear layer; module names look like "
                              "'decoder.layers.0.mlp.linear_fc1' or 'output_layer' (fnmatch syntax).")
    if counts[-1] == 0:
        raise ConfigError("sparsity.exclude leaves no linear layer to prune; remove some patterns.")


def _apply(model: nn.Module, cfg: SparsityConfig) -> int:
    axes = linear_tp_axes()
    plan = plan_sparsity(model, cfg)
    for name, module in plan.layers:
        convert_to_sparse(module, name, axes[megatron_type(module)])
    if is_main_rank():
        print(f"[nemo_quant] sparsity {cfg.n}:{cfg.m} ({SparsityMethod(cfg.method).value}): {len(plan.layers)} linear "
              f"layers on rank 0's stage; masks are chosen by sparsify()", flush=True)
    return len(plan.layers)


def _sparsify(model: nn.Module, forward_loop):
    from nemo_quant.sparsity.one_shot import sparsify

    return sparsify(model, forward_loop)


def _loaded_problem(model: nn.Module, cfg: SparsityConfig) -> str | None:
    """A checkpoint's weights must be zero where its masks are (its masks hold the pattern)."""
    from nemo_quant.sparsity.modules import sparse_layers
    from nemo_quant.sparsity.patterns import pattern_violations, revived_weights

    for name, module in sparse_layers(model):
        revived = revived_weights(module.weight, module.sparse_mask)
        if revived:
            return (f"{name}: {revived} weights are nonzero where its sparsity mask is 0 (the checkpoint's weights "
                    "violate its masks); it was edited or trained outside nemo_quant: re-run sparsify on it.")
        if pattern_violations(module.sparse_mask, cfg.n, cfg.m) and bool((~module.sparse_mask).any()):
            return f"{name}: its sparsity mask breaks the {cfg.n}:{cfg.m} pattern the checkpoint's modes declare."
    return None


SPARSITY = register_mode(Mode(
    name="sparsity",
    config_class=SparsityConfig,
    apply=_apply,
    may_follow=frozenset({"prune"}),
    validate=validate_sparsity_config,
    check=_check,
    data_step=_sparsify,
    loaded_problem=_loaded_problem,
))
