"""The `nemo-quant` app's config composed outside a Hydra run (launchers, other frameworks'
integrations): the same groups, schemas and checks, errors as ConfigError."""
from __future__ import annotations

from omegaconf import DictConfig

from nemo_quant.config.validate import ConfigError


def compose_app_config(overrides: list[str]) -> DictConfig:
    """conf/config.yaml with `overrides` (Hydra syntax, e.g. ["command=train", "quant=fp8"])."""
    from hydra import compose, initialize_config_module
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from nemo_quant.config.schema import register_configs

    register_configs()
    try:
        with initialize_config_module("nemo_quant.conf", version_base="1.3"):
            return compose("config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"the nemo-quant arguments do not compose: {e}") from None


def compose_command(args: list[str]) -> DictConfig:
    """What `nemo-quant <args>` composes: an optional command word, then Hydra overrides."""
    command, overrides = (args[0], args[1:]) if args and "=" not in args[0] else (None, list(args))
    return compose_app_config([f"command={command}"] * bool(command) + overrides)
