"""Functions the QLoRA distributed tests run in spawned gloo ranks (tests/distributed)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def _digests(directory: str) -> dict[str, str]:
    root = Path(directory)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def qlora_run(model_path: str, tp: int, pp: int, qlora_cfg: dict, windows: torch.Tensor, steps: int,
              save_dir: str, export_dir: str | None = None, crash_after: int | None = None, lr: float = 1e-3):
    """Apply qlora (or resume from save_dir), export right after applying when asked, train to
    `steps` (raising after `crash_after` steps when asked); returns (losses, eval logits, export
    digests) on every rank (logits and digests where this rank has them)."""
    from nemo_quant.export import ExportConfig, export_checkpoint
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, is_main_rank
    from nemo_quant.training.loop import TrainState, latest_checkpoint, make_optimizer, resume, train
    from tests.quant_helpers import logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    previous = latest_checkpoint(save_dir)
    loaded = load_model(model_path, with_weights=previous is None)
    model = loaded.model

    def make(m):
        return make_optimizer(m, lr, 0.0, (0.9, 0.95))

    digests = None
    if previous is not None:
        optimizer, state = resume(model, make, previous)
    else:
        apply_modes(model, [("qlora", qlora_cfg)])
        if export_dir is not None:
            export_checkpoint(model, loaded.source.arch, ExportConfig(format="peft", path=export_dir, dtype="float32"))
            digests = _digests(export_dir) if is_main_rank() else None
        optimizer, state = make(model), TrainState()
    if crash_after is not None:
        real_step = optimizer.step

        def step(*args, **kwargs):
            if state.step == crash_after:
                raise RuntimeError(f"injected crash after {crash_after} steps")
            return real_step(*args, **kwargs)

        optimizer.step = step
    state = train(model, loaded.source.arch, optimizer, windows, state, steps, 1, Path(save_dir), save_every=2)
    evals = windows[:2, :-1]
    return state.losses, logits(model, evals), digests


def qlora_restored_logits(checkpoint: str, tp: int, pp: int, evals: torch.Tensor):
    from nemo_quant.checkpoint.model_checkpoint import load_model_checkpoint
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.quant_helpers import logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    return logits(load_model_checkpoint(checkpoint), evals)

