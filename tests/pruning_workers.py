"""Spawned-rank functions of the pruning and distillation tests (module-level for the spawn context)."""
from __future__ import annotations

import torch


def _init(tp: int, pp: int) -> None:
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)


def prune_run(model_path: str, tp: int, pp: int, prune_cfg: dict, calib: torch.Tensor, evals: torch.Tensor,
              save_dir: str | None = None, export_dir: str | None = None, export_dtype: str = "bfloat16"):
    """Prune at TP x PP: (plan, full-vocab logits of `evals` on the last stage, HF export digests on rank 0)."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes, get_mode, mode_config
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from tests.quant_helpers import logits
    from tests.workers import _hf_export_digests

    _init(tp, pp)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("prune", prune_cfg)])
    get_mode("prune").data_step(loaded.model, windows_forward_loop(calib))
    if save_dir is not None:
        from nemo_quant.checkpoint.model_checkpoint import save_model

        save_model(loaded.model, loaded.source.arch, save_dir)
    digests = None
    if export_dir is not None:
        from nemo_quant.export.writer import export_checkpoint

        export_checkpoint(loaded.model, loaded.arch, {"format": "hf", "path": export_dir, "dtype": export_dtype},
                          loaded.tokenizer)
        digests = _hf_export_digests_of(export_dir)
    return mode_config(loaded.model, "prune").plan, logits(loaded.model, evals, loaded.vocab_size), digests


def _hf_export_digests_of(export_dir: str):
    import hashlib
    from pathlib import Path

    from nemo_quant.runtime.distributed_init import is_main_rank

    if not is_main_rank():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(export_dir).iterdir())}


def kl_on_shards(student: torch.Tensor, teacher: torch.Tensor, temperature: float, true_vocab: int, tp: int):
    """Per-token KL and the student's gradient from this TP rank's vocab slices (full grad gathered)."""
    from megatron.core import parallel_state as ps

    from nemo_quant.distill.kl import vocab_parallel_kl
    from nemo_quant.distributed import tp_all_gather

    _init(tp, 1)
    rank = ps.get_tensor_model_parallel_rank()
    s = student.chunk(tp, dim=-1)[rank].clone().requires_grad_(True)
    kl = vocab_parallel_kl(s, teacher.chunk(tp, dim=-1)[rank], temperature, true_vocab)
    kl.sum().backward()
    return kl.detach(), tp_all_gather(s.grad, dim=-1)


def prune_message(model_path: str, tp: int, pp: int, prune_cfg: dict) -> str | None:
    """The refusal of `prune_cfg` at TP x PP before any work (None if it passes)."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.preflight import PreflightError, preflight

    _init(tp, pp)
    loaded = load_model(model_path)
    try:
        preflight(loaded.model, loaded.source.arch, [("prune", prune_cfg)])
    except PreflightError as e:
        return str(e)
    return None


def distill_steps(model_path: str, tp: int, pp: int, prune_plan: dict, windows: torch.Tensor, steps: int,
                  save_dir: str, layers: list[str]):
    """A pruned student distilled from the unpruned model for `steps`: the losses."""
    from nemo_quant.distill.config import DistillConfig
    from nemo_quant.distill.teacher import build_teacher, distill_objective
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.training.loop import TrainState, make_optimizer, train
    from pathlib import Path

    _init(tp, pp)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("prune", {"plan": prune_plan})])
    cfg = DistillConfig(layers=layers, lm_weight=0.5)
    teacher = build_teacher(model_path, "float32", None, cfg, loaded.vocab_size)
    objective = distill_objective(cfg, loaded.model, teacher, loaded.vocab_size)
    opt = make_optimizer(loaded.model, 1e-3, 0.0)
    state = train(loaded.model, loaded.source.arch, opt, windows, TrainState(), steps, 1, Path(save_dir), steps,
                  objective=objective)
    return state.losses
