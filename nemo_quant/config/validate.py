"""Semantic checks the type system cannot express, run before any work starts."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


def _positive(cfg: DictConfig, key: str) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value < 1:
        raise ConfigError(f"{key}={value}: must be a positive integer.")


def validate(cfg: DictConfig) -> None:
    for key in ("parallel.tp", "parallel.pp", "parallel.timeout_s", "data.seq_length",
                "data.calib_samples", "data.eval_samples", "data.batch_size"):
        _positive(cfg, key)
    if cfg.data.seq_length < 2:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length}: a window needs at least 2 tokens.")
    if cfg.model.path is not None and not Path(cfg.model.path).expanduser().exists():
        raise ConfigError(f"model.path={cfg.model.path} does not exist; give a .gguf file or an HF safetensors directory.")
    if cfg.data.name == "files":
        for key in ("calib_files", "eval_files"):
            for path in cfg.data[key]:
                if not Path(path).expanduser().is_file():
                    raise ConfigError(f"data.{key}: {path} does not exist.")
        if not cfg.data.eval_files and cfg.command == "eval":
            raise ConfigError("data.name=files needs data.eval_files=[...] for `nemo-quant eval`.")
