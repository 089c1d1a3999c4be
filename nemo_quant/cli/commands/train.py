"""`nemo-quant train`: QAT (quantizers on, scales frozen) or plain fine-tuning, resumable.

Start points, in order: the latest checkpoint under checkpoint.save (resume), a nemo_quant
checkpoint in checkpoint.load (e.g. a PTQ result: QAT continues from it), or the configured
model with quant=<preset> applied and calibrated here.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from nemo_quant.cli.commands.common import load_for_command, megatron_session, quant_config, report, write_results


def run_train(cfg: DictConfig) -> None:
    from nemo_quant.data.datasets import calibration_windows, training_windows
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes, mode_state
    from nemo_quant.preflight import preflight
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.training.loop import TrainState, latest_checkpoint, make_optimizer, resume, train

    save_dir = Path(cfg.checkpoint.save).expanduser()
    with megatron_session(cfg):
        previous = latest_checkpoint(save_dir) if cfg.train.resume else None
        if previous is not None:
            loaded = load_model(cfg.model.path, cfg.model.dtype.value, cfg.model.tokenizer, with_weights=False)
            optimizer = make_optimizer(loaded.model, cfg.train.lr, cfg.train.weight_decay)
            state = resume(loaded.model, optimizer, previous)
            preflight(loaded.model, loaded.source.arch, [], cfg.export)
            origin = f"resumed from {previous} (step {state.step})"
        else:
            loaded = load_for_command(cfg)
            origin = f"checkpoint {cfg.checkpoint.load}" if cfg.checkpoint.load else "model weights"
            quantize = cfg.quant is not None and not any(m["name"] == "quantize" for m in mode_state(loaded.model))
            preflight(loaded.model, loaded.source.arch, [("quantize", quant_config(cfg))] if quantize else [], cfg.export)
            if quantize:
                apply_modes(loaded.model, [("quantize", quant_config(cfg))])
                calibrate(loaded.model, windows_forward_loop(calibration_windows(cfg.data, loaded.tokenizer), cfg.data.batch_size))
                origin += f" + {cfg.quant.name} calibrated"
            optimizer = make_optimizer(loaded.model, cfg.train.lr, cfg.train.weight_decay)
            state = TrainState()
        windows = training_windows(cfg.data, cfg.train, loaded.tokenizer)
        state = train(loaded.model, loaded.source.arch, optimizer, windows, state, cfg.train.steps,
                      cfg.train.micro_batch_size, save_dir, cfg.train.save_every, cfg.train.log_every)
        first, last = state.losses[0], state.losses[-1]
        report({"start": origin, "modes": ", ".join(m["name"] for m in mode_state(loaded.model)) or "none",
                "steps": state.step, "loss first -> last": f"{first:.4f} -> {last:.4f}", "checkpoint": str(save_dir)})
        exported = {}
        if cfg.export is not None:
            from nemo_quant.cli.commands.export import export_step

            exported = export_step(cfg, loaded)
        write_results({"steps": state.step, "losses": state.losses, "checkpoint": str(save_dir), **exported})
