"""Modes: named, configured, in-place model transformations with a replayable state.

Each applied mode is recorded on the model as {"name", "config"} (plain JSON). That ordered
state is saved next to the weights (Megatron dist checkpoint, plain torch, Lightning) and
replayed by `restore_modes` on a freshly built model *before* its weights load, so the
quantizer buffers exist when the checkpoint fills them.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from omegaconf import OmegaConf
from torch import nn

STATE_ATTR = "_nemo_quant_modes"


class ModeError(ValueError):
    pass


@dataclass(frozen=True)
class Mode:
    name: str
    config_class: type
    apply: Callable[[nn.Module, Any], Any]  # mutates the model in place
    may_follow: frozenset[str] = frozenset()  # modes allowed to precede this one
    validate: Callable[[Any], None] = lambda cfg: None
    # Refusals decided by the config and the model's shapes, without changing the model; run by
    # the preflight on every rank before any forward pass (it may use collectives).
    check: Callable[[nn.Module, Any], None] = lambda model, cfg: None
    # What the mode does with calibration data right after `apply` (quantize: calibrate the
    # scales; sparsity: choose the masks): (model, forward_loop) -> a report. Not replayed.
    data_step: Callable[[nn.Module, Callable[[nn.Module], None]], Any] | None = None
    # What a loaded checkpoint must satisfy (e.g. pruned weights are zero): the problem, or None.
    loaded_problem: Callable[[nn.Module, Any], str | None] = lambda model, cfg: None
    # Config keys the data step fills in (`record_decision`), not set by users: a resumed run's
    # config is compared without them.
    decisions: frozenset[str] = frozenset()
    # State-dict key prefixes a checkpoint keeps when this mode is applied (speculative heads: only
    # the heads; the frozen base is rebuilt from model.path). Empty: the whole model.
    checkpoint_prefixes: tuple[str, ...] = ()


_MODES: dict[str, Mode] = {}
CANONICAL_ORDER = "prune -> sparsity -> quantize | qlora -> speculative heads"
# Built-in modes, imported on first use: each registers itself; none imports another's internals.
_BUILTIN_MODES = ("nemo_quant.pruning.mode", "nemo_quant.quantization.mode", "nemo_quant.sparsity.mode",
                  "nemo_quant.qlora.mode", "nemo_quant.speculative.mode")


def register_mode(mode: Mode) -> Mode:
    _MODES[mode.name] = mode
    return mode


def _ensure_builtin_modes() -> None:
    for module in _BUILTIN_MODES:
        importlib.import_module(module)


def get_mode(name: str) -> Mode:
    _ensure_builtin_modes()
    if name not in _MODES:
        raise ModeError(f"unknown mode {name!r}; registered modes: {', '.join(sorted(_MODES))}")
    return _MODES[name]


def mode_state(model: nn.Module) -> list[dict]:
    return list(getattr(model, STATE_ATTR, []))


def mode_config(model: nn.Module, name: str) -> Any | None:
    """The typed config `name` was applied with on `model` (None if it was not)."""
    entries = [e for e in mode_state(model) if e["name"] == name]
    return _to_config(get_mode(name), entries[-1]["config"]) if entries else None


def _to_config(mode: Mode, cfg: Any):
    """Accept a dataclass, a DictConfig or a plain dict; return the typed dataclass."""
    merged = OmegaConf.merge(OmegaConf.structured(mode.config_class), cfg)
    return OmegaConf.to_object(merged)


def _check_order(name: str, mode: Mode, applied: list[str]) -> None:
    for earlier in applied:
        if earlier not in mode.may_follow:
            raise ModeError(
                f"mode {name!r} cannot be applied after {earlier!r} (allowed before it: "
                f"{', '.join(sorted(mode.may_follow)) or 'nothing'}); change the order of the modes "
                f"(canonical order: {CANONICAL_ORDER})."
            )


def check_modes(model: nn.Module, modes: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """Validate `[(mode_name, config), ...]` against the model as `apply_modes` would see it
    (order after the modes already applied, each config, each mode's shape checks) without
    changing anything; returns the typed configs. Every rank must call it (checks may be
    collective)."""
    applied = [entry["name"] for entry in mode_state(model)]
    typed_modes = []
    for name, cfg in modes:
        mode = get_mode(name)
        _check_order(name, mode, applied)
        typed = _to_config(mode, cfg)
        mode.validate(typed)
        mode.check(model, typed)
        applied.append(name)
        typed_modes.append((name, typed))
    return typed_modes


def apply_mode(model: nn.Module, name: str, cfg: Any) -> Any:
    mode = get_mode(name)
    _check_order(name, mode, [entry["name"] for entry in mode_state(model)])
    typed = _to_config(mode, cfg)
    mode.validate(typed)
    mode.check(model, typed)
    result = mode.apply(model, typed)
    plain = OmegaConf.to_container(OmegaConf.structured(typed), enum_to_str=True)
    setattr(model, STATE_ATTR, [*mode_state(model), {"name": name, "config": plain}])
    return result


def apply_modes(model: nn.Module, modes: list[tuple[str, Any]]) -> nn.Module:
    """Apply `[(mode_name, config), ...]` in order, in place; returns the same model."""
    for name, cfg in modes:
        apply_mode(model, name, cfg)
    return model


def record_decision(model: nn.Module, name: str, key: str, value: Any) -> None:
    """Store what mode `name`'s data step decided (e.g. prune's plan) in its saved config, so a
    checkpoint's replay repeats the decision instead of re-deriving it."""
    entries = [e for e in mode_state(model) if e["name"] == name]
    if not entries:
        raise ModeError(f"mode {name!r} was not applied to this model")
    entries[-1]["config"][key] = value


def restore_modes(model: nn.Module, state: list[dict]) -> nn.Module:
    """Replay a saved mode state on a model that has none yet (before loading weights)."""
    if mode_state(model):
        raise ModeError("restore_modes needs a model without modes; build a fresh model first.")
    for entry in state:
        apply_mode(model, entry["name"], entry["config"])
    return model


def saved_prefixes(state: list[dict]) -> tuple[str, ...]:
    """The key prefixes a checkpoint of a model with `state` holds (empty: everything)."""
    return tuple(p for entry in state for p in get_mode(entry["name"]).checkpoint_prefixes)


def loaded_problems(model: nn.Module) -> str | None:
    """The first rule a just-loaded model breaks (each applied mode's `loaded_problem`) on this rank."""
    for entry in mode_state(model):
        mode = get_mode(entry["name"])
        problem = mode.loaded_problem(model, _to_config(mode, entry["config"]))
        if problem:
            return problem
    return None
