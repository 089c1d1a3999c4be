"""The `nemo-quant` Hydra app: `nemo-quant <command> [hydra overrides...]`.

The command is the first word (`nemo-quant eval parallel.tp=2`) or `command=...`; everything
else is ordinary Hydra (overrides, `--cfg job`, `-m` multirun).
"""
from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from nemo_quant.config.schema import Command, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://nemo_quant.conf", config_name="config")
def hydra_entry(cfg: DictConfig) -> None:
    from nemo_quant.cli.commands import COMMANDS
    from nemo_quant.config.validate import validate

    validate(cfg)
    COMMANDS[cfg.command](cfg)


def main() -> None:
    args = sys.argv[1:]
    if args and not args[0].startswith("-") and "=" not in args[0]:
        command = args.pop(0)
        if command not in Command.__members__:
            sys.exit(f"nemo-quant: unknown command {command!r}; choose one of {', '.join(Command.__members__)}")
        args.insert(0, f"command={command}")
    sys.argv = [sys.argv[0], *args]
    hydra_entry()


if __name__ == "__main__":
    main()
