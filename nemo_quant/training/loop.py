"""A Megatron training loop for QAT, QAD, distillation and fine-tuning (TP x PP x DP), with periodic,
resumable checkpoints.

Quantizer scales are buffers, so the optimizer never touches them: QAT trains the weights
through the straight-through estimator with the calibrated scales frozen.
Checkpoints go to `<save>/step_<N>/` (model dist checkpoint + modes + optimizer + trainer
state) and `<save>/latest` names the newest complete one; a crash mid-save leaves the
previous one intact. A preemption warning (runtime/preemption.py) saves at the current step and
raises Preempted.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from nemo_quant.checkpoint.model_checkpoint import load_into, save_model
from nemo_quant.models.arch import LlamaArch
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.runtime.pipeline import position_ids_for
from nemo_quant.runtime.preemption import Preempted, preemption_requested
from nemo_quant.training.optimizer_state import load_optimizer, save_optimizer
from nemo_quant.utils.progress import progress

TRAINER_STATE = "trainer_state.json"
LATEST = "latest"


@dataclass
class TrainState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    pointer = Path(save_dir) / LATEST
    if not pointer.is_file():
        return None
    candidate = Path(save_dir) / pointer.read_text().strip()
    return candidate if (candidate / TRAINER_STATE).is_file() else None


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))


def _set_lr(optimizer: torch.optim.Optimizer, step: int, warmup_steps: int) -> None:
    """Linear warm-up to each group's base lr over `warmup_steps`, constant after; a function
    of the step alone, so a resumed run continues the schedule exactly."""
    for group in optimizer.param_groups:
        base = group.setdefault("base_lr", group["lr"])
        group["lr"] = base * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base


def resume(model: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer],
           checkpoint: Path) -> tuple[torch.optim.Optimizer, TrainState]:
    """`model` must be freshly built (no modes): the checkpoint's modes are replayed first, then
    the optimizer is made (`make_opt(model)`: modes decide what trains) and its state loaded."""
    load_into(model, checkpoint)
    optimizer = make_opt(model)
    load_optimizer(optimizer, checkpoint, dist.get_rank() if dist.is_initialized() else 0)
    return optimizer, TrainState(**json.loads((checkpoint / TRAINER_STATE).read_text()))


def _save(model, arch, optimizer, state: TrainState, save_dir: Path) -> None:
    name = f"step_{state.step}"
    rank = dist.get_rank() if dist.is_initialized() else 0

    def write_extra(staging: Path) -> None:
        save_optimizer(optimizer, staging, rank)
        if is_main_rank():
            (staging / TRAINER_STATE).write_text(json.dumps(state.__dict__))

    save_model(model, arch, save_dir / name, overwrite=True, extra_writer=write_extra)
    if is_main_rank():
        tmp = save_dir / f".{LATEST}.tmp"
        tmp.write_text(name)
        tmp.replace(save_dir / LATEST)


def _sync_grads(model: nn.Module) -> None:
    """Average gradients over DP replicas; under PP, sum the tied embedding's gradient over the
    first and last stage (each holds a copy of the shared weight)."""
    from megatron.core import parallel_state as ps

    if ps.get_pipeline_model_parallel_world_size() > 1 and getattr(model, "share_embeddings_and_output_weights", False):
        if ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage():
            weight = model.shared_embedding_or_output_weight()
            if weight.grad is not None:
                dist.all_reduce(weight.grad, group=ps.get_embedding_group())
    dp = ps.get_data_parallel_world_size()
    if dp == 1:
        return
    group = ps.get_data_parallel_group()
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
            p.grad /= dp


def forward_backward(model: nn.Module, batch: torch.Tensor, micro_batch_size: int, objective=None) -> torch.Tensor:
    """One step's forward and backward through Megatron's schedule (pipelined when PP > 1).

    `objective` (default: next-token loss) gives each micro-batch's forward and loss, e.g.
    distillation (nemo_quant/distill/objective.py). Returns the mean loss of this DP rank's batch
    on every rank of its pipeline."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_quant.distill.objective import LMObjective

    objective = objective or LMObjective()
    micro_batches = list(batch.split(micro_batch_size))
    objective.begin_step(micro_batches)

    def forward_step(data_iterator, model_chunk):
        chunk = next(data_iterator)
        return objective.forward(model_chunk, chunk[:, :-1], chunk[:, 1:])

    try:
        reports = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=batch.shape[1] - 1,
            micro_batch_size=micro_batch_size, forward_only=False,
        )
    finally:
        objective.end_step()
    loss = torch.zeros((), dtype=torch.float64)
    if ps.is_pipeline_last_stage():
        loss += torch.stack([r["loss"].double() for r in reports]).mean()
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    return loss


def train(model: nn.Module, arch: LlamaArch, optimizer: torch.optim.Optimizer, windows: torch.Tensor,
          state: TrainState, steps: int, micro_batch_size: int, save_dir: Path, save_every: int,
          log_every: int = 10, warmup_steps: int = 0, objective=None) -> TrainState:
    """Train until `state.step == steps`; micro-batches cycle through `windows` (DP-sharded).
    `objective`: what each micro-batch's loss is (default: next-token loss; see forward_backward)."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per_step = micro_batch_size * dp
    batches_per_epoch = max(1, windows.shape[0] // per_step)
    model.train()
    bar = progress(total=steps, desc="train", unit="step")
    bar.update(state.step)
    while state.step < steps:
        i = state.step % batches_per_epoch
        batch = windows[i * per_step:(i + 1) * per_step][dp_rank::dp]
        optimizer.zero_grad(set_to_none=True)
        _set_lr(optimizer, state.step, warmup_steps)
        loss = forward_backward(model, batch, micro_batch_size, objective)
        _sync_grads(model)
        optimizer.step()
        if dp > 1:
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            loss /= dp
        value = float(loss)
        if not math.isfinite(value):
            raise FloatingPointError(f"loss became {value} at step {state.step + 1}; lower train.lr.")
        state.step += 1
        state.losses.append(value)
        bar.update(1)
        if state.step % log_every == 0:
            bar.set_postfix(loss=f"{value:.4f}")
        preempted = state.step < steps and preemption_requested()
        if preempted or state.step % save_every == 0 or state.step == steps:
            _save(model, arch, optimizer, state, save_dir)
        if preempted:
            bar.close()
            raise Preempted(state.step, str(save_dir / f"step_{state.step}"))
    bar.close()
    return state
