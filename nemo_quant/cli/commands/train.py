"""`nemo-quant train`: QAT (quantizers on, scales frozen), sparse fine-tuning (masks
kept), or plain fine-tuning, resumable.

Start points, in order: the latest checkpoint under checkpoint.save (resume), a nemo_quant
checkpoint in checkpoint.load (e.g. a PTQ result: QAT continues from it), or the configured
model with sparsity=<preset> / quant=<preset> applied here (masks chosen, scales calibrated).
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_quant.cli.commands.common import (
    apply_with_data, configured_modes, load_for_command, megatron_session, report, write_results,
)


def check_resume_modes(cfg: DictConfig, saved: list[dict], checkpoint: Path) -> None:
    """A resumed run must continue with the modes it was started with: any configured mode the
    checkpoint lacks, or holds with other values, fails here, naming the keys."""
    from omegaconf import OmegaConf

    from nemo_quant.config.validate import ConfigError
    from nemo_quant.modes import get_mode

    group = {"quantize": "quant", "medusa": "speculative", "eagle": "speculative", "mtp": "speculative"}  # mode -> group
    for name, typed in configured_modes(cfg):
        key = group.get(name, name)
        mode = get_mode(name)
        entries = [e["config"] for e in saved if e["name"] == name]
        if not entries:
            raise ConfigError(f"{key}=... is set, but the run in {checkpoint} was started without it; resume without "
                              f"{key}, or start a new run (a new checkpoint.save, or train.resume=false).")
        want = OmegaConf.to_container(OmegaConf.structured(typed), enum_to_str=True)
        have = OmegaConf.to_container(OmegaConf.merge(OmegaConf.structured(mode.config_class), entries[-1]),
                                      enum_to_str=True)
        diffs = [f"{key}.{k}={want[k]!r} (the run has {have.get(k)!r})" for k in want
                 if k not in mode.decisions and want[k] != have.get(k)]
        if diffs:
            raise ConfigError(f"resuming {checkpoint} with a different {key} config: {'; '.join(diffs)}. Resume with "
                              "the run's own config, or start a new run (a new checkpoint.save, or train.resume=false).")


def _teacher(cfg: DictConfig):
    """The frozen teacher of `distill=...` (None without it), built before the student's modes."""
    if cfg.get("distill") is None:
        return None
    from omegaconf import OmegaConf

    from nemo_quant.distill.teacher import build_teacher
    from nemo_quant.models.loading import load_tokenizer, resolve_model_path
    from nemo_quant.models.sources import open_source

    vocab = open_source(resolve_model_path(cfg.model.path)).arch.vocab_size
    return build_teacher(cfg.model.path, cfg.model.dtype.value, cfg.model.tokenizer, OmegaConf.to_object(cfg.distill),
                         vocab)


def run_train(cfg: DictConfig) -> None:
    from nemo_quant.checkpoint.model_checkpoint import read_modes
    from nemo_quant.data.datasets import calibration_windows, training_windows
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import mode_state
    from nemo_quant.preflight import preflight
    from nemo_quant.training.loop import TrainState, latest_checkpoint, make_optimizer, resume, train

    save_dir = Path(cfg.checkpoint.save).expanduser()
    previous = latest_checkpoint(save_dir) if cfg.train.resume else None
    if previous is not None:
        check_resume_modes(cfg, read_modes(previous), previous)
    with megatron_session(cfg):
        teacher = _teacher(cfg)  # before any work: a teacher that cannot serve fails here
        if previous is not None:
            from nemo_quant.checkpoint.model_checkpoint import holds_base

            loaded = load_model(cfg.model.path, cfg.model.dtype.value, cfg.model.tokenizer,
                                with_weights=not holds_base(previous))
            optimizer, state = resume(loaded.model, lambda m: make_optimizer(
                m, cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_betas), previous)
            preflight(loaded.model, loaded.arch, [], cfg.export)
            origin = f"resumed from {previous} (step {state.step})"
        else:
            loaded = load_for_command(cfg)
            origin = f"checkpoint {cfg.checkpoint.load}" if cfg.checkpoint.load else "model weights"
            modes = configured_modes(cfg, loaded.model)
            preflight(loaded.model, loaded.source.arch, modes, cfg.export)
            if modes:
                apply_with_data(cfg, loaded.model, modes, calibration_windows(cfg.data, loaded.tokenizer))
                origin += "".join(f" + {c.name} applied" for _, c in modes)
            optimizer = make_optimizer(loaded.model, cfg.train.lr, cfg.train.weight_decay, cfg.train.adam_betas)
            state = TrainState()
        windows = training_windows(cfg.data, cfg.train, loaded.tokenizer)
        objective = None
        from nemo_quant.speculative.jobs import heads_config

        spec = heads_config(loaded.model)
        if spec is not None:
            from nemo_quant.speculative.jobs import training_sequences
            from nemo_quant.speculative.objective import SpeculativeObjective

            windows = training_sequences(cfg, spec, loaded.model, windows, loaded.vocab_size)
            objective = SpeculativeObjective(loaded.model, spec, loaded.vocab_size)
        if teacher is not None:
            from omegaconf import OmegaConf

            from nemo_quant.distill.teacher import distill_objective

            objective = distill_objective(OmegaConf.to_object(cfg.distill), loaded.model, teacher, loaded.vocab_size)
        state = train(loaded.model, loaded.source.arch, optimizer, windows, state, cfg.train.steps,
                      cfg.train.micro_batch_size, save_dir, cfg.train.save_every, cfg.train.log_every,
                      cfg.train.warmup_steps, objective)
        first, last = state.losses[0], state.losses[-1]
        kind = f"distill={cfg.distill.name}" if teacher is not None else f"heads={spec.method.value}" if spec else "lm"
        report({"start": origin, "objective": kind,
                "modes": ", ".join(m["name"] for m in mode_state(loaded.model)) or "none",
                "steps": state.step, "loss first -> last": f"{first:.4f} -> {last:.4f}", "checkpoint": str(save_dir)})
        exported = {}
        if cfg.export is not None:
            from nemo_quant.cli.commands.export import export_step

            exported = export_step(cfg, loaded)
        write_results({"steps": state.step, "losses": state.losses, "checkpoint": str(save_dir), **exported})
