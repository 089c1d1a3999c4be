"""The `nemo-quant` Hydra app: `nemo-quant <command> [hydra overrides...]`.

The command is the first word (`nemo-quant eval parallel.tp=2`) or `command=...`; everything
else is ordinary Hydra (overrides, `--cfg job`, `-m` multirun).
"""
from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from nemo_quant.config.schema import Command, register_configs

register_configs()


@hydra.main(version_base="1.3", config_path="pkg://nemo_quant.conf", config_name="config")
def hydra_entry(cfg: DictConfig) -> None:
    from nemo_quant.cli.commands import COMMANDS
    from nemo_quant.config.validate import ConfigError, validate
    from nemo_quant.runtime.preemption import EXIT_PREEMPTED, Preempted

    try:
        _resolve_training_run(cfg)
        validate(cfg)
        COMMANDS[cfg.command](cfg)
    except Preempted as e:  # the launcher requeues the job; train.resume picks up the checkpoint
        if os.environ.get("RANK", "0") == "0":
            print(f"nemo-quant {getattr(cfg.command, 'value', cfg.command)}: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_PREEMPTED)
    except ConfigError as e:  # the preflight's refusals: a message naming the key and the fix, no traceback
        if os.environ.get("RANK", "0") == "0":
            print(f"nemo-quant {getattr(cfg.command, 'value', cfg.command)}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def _resolve_training_run(cfg: DictConfig) -> None:
    """checkpoint.load may name a training run's save directory: its latest complete checkpoint."""
    from nemo_quant.training.loop import latest_checkpoint

    if cfg.checkpoint.load is not None and (latest := latest_checkpoint(cfg.checkpoint.load)) is not None:
        if os.environ.get("RANK", "0") == "0":
            print(f"checkpoint.load={cfg.checkpoint.load}: its latest checkpoint, {latest.name}", flush=True)
        cfg.checkpoint.load = str(latest)


def compose_check(args: list[str]) -> int:
    """`nemo-quant compose-check -- CMD ARGS... -- CMD ARGS...`: does each call compose (presets, keys,
    types; no work done)? Prints the first that does not; exit 2 then."""
    from nemo_quant.config.compose import compose_command
    from nemo_quant.config.validate import ConfigError

    calls, current = [], None
    for arg in args:
        if arg == "--":
            current = []
            calls.append(current)
        elif current is not None:
            current.append(arg)
    for call in calls:
        try:
            compose_command(call)
        except ConfigError as e:
            print(f"nemo-quant {' '.join(call)}: {e}", file=sys.stderr)
            return 2
    return 0


# Hydra flags that take a value; argparse wants flags before the positional overrides.
_VALUE_FLAGS = {"--config-dir", "-cd", "--config-path", "-cp", "--config-name", "-cn", "--cfg", "-c", "--package", "-p",
                "--experimental-rerun", "--info", "-i"}


def _flags_first(args: list[str]) -> list[str]:
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("-"):
            flags.append(arg)
            if arg in _VALUE_FLAGS and i + 1 < len(args) and "=" not in args[i + 1] and not args[i + 1].startswith("-"):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags + overrides


def main() -> None:
    args = sys.argv[1:]
    if args and args[0] == "validate":  # not a Hydra job: pure Python over the checkpoint files
        from nemo_quant.export.validate import main as validate_main

        sys.exit(validate_main(args[1:]))
    if args and args[0] == "compose-check":  # several calls' configs checked in one process (recipes)
        sys.exit(compose_check(args[1:]))
    if args and not args[0].startswith("-") and "=" not in args[0]:
        command = args.pop(0)
        if command not in Command.__members__:
            sys.exit(f"nemo-quant: unknown command {command!r}; choose one of {', '.join(Command.__members__)}, validate")
        args.insert(0, f"command={command}")
    sys.argv = [sys.argv[0], *_flags_first(args)]
    hydra_entry()


if __name__ == "__main__":
    main()
