"""Megatron distributed checkpoints of a (mode-converted) model, with the mode state beside them.

Layout of a checkpoint directory:
  model/                Megatron dist checkpoint (torch_dist), reshardable across TP/PP
  nemo_quant_modes.json ordered mode state, replayed before the weights load
  arch.json             the Llama architecture, so `load` can rebuild the model
The modes and architecture are JSON, never pickles.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from nemo_quant.checkpoint.atomic import atomic_directory
from nemo_quant.distributed import barrier, gather_messages
from nemo_quant.models.arch import LlamaArch
from nemo_quant.modes import loaded_problems, mode_state, restore_modes, saved_prefixes
from nemo_quant.runtime.distributed_init import is_main_rank

MODES_FILE = "nemo_quant_modes.json"
ARCH_FILE = "arch.json"
MODEL_DIR = "model"


def save_model(model: nn.Module, arch: LlamaArch, path: str | Path, overwrite: bool = False, extra_writer=None) -> Path:
    """All ranks call this. `extra_writer(staging_dir)` may add files (e.g. optimizer state)."""
    from megatron.core import dist_checkpointing

    with atomic_directory(path, overwrite) as staging:
        if is_main_rank():
            (staging / MODEL_DIR).mkdir()
        barrier()
        dist_checkpointing.save(_kept(model.sharded_state_dict(), saved_prefixes(mode_state(model))),
                                str(staging / MODEL_DIR))
        if is_main_rank():
            (staging / MODES_FILE).write_text(json.dumps(mode_state(model), indent=2))
            (staging / ARCH_FILE).write_text(json.dumps(dataclasses.asdict(arch), indent=2))
        if extra_writer is not None:
            extra_writer(staging)
    return Path(path)


def _kept(state: dict, prefixes: tuple[str, ...]) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefixes)} if prefixes else state


def holds_base(path: str | Path) -> bool:
    """False for a checkpoint that holds only a mode's modules (speculative heads): its base must be
    built with weights from model.path before `load_into`."""
    return not saved_prefixes(read_modes(path))


def read_arch(path: str | Path) -> LlamaArch:
    return LlamaArch(**json.loads((Path(path) / ARCH_FILE).read_text()))


def read_modes(path: str | Path) -> list[dict]:
    return json.loads((Path(path) / MODES_FILE).read_text())


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Replay the saved modes on a freshly built `model`, then load the weights (any TP/PP)."""
    from megatron.core import dist_checkpointing

    path = Path(path)
    if not (path / MODEL_DIR).is_dir():
        raise FileNotFoundError(f"{path} is not a nemo_quant checkpoint (no {MODEL_DIR}/ inside).")
    restore_modes(model, read_modes(path))
    prefixes = saved_prefixes(mode_state(model))
    state = dist_checkpointing.load(_kept(model.sharded_state_dict(), prefixes), str(path / MODEL_DIR))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state") and (not prefixes or k.startswith(prefixes))]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not fit the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
    problems = [p for p in gather_messages(loaded_problems(model)) if p]
    if problems:
        raise ValueError(f"{path}: {problems[0]}")
    return model


def load_model_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Build this rank's shard from arch.json and load the checkpoint into it."""
    from nemo_quant.models.builder import build_gpt_model

    if not holds_base(path):
        raise ValueError(f"{path} holds only speculative heads: load the base from model.path first (nemo-quant "
                         "commands do: model.path=<base> checkpoint.load=<heads>).")
    return load_into(build_gpt_model(read_arch(path), dtype), path)
