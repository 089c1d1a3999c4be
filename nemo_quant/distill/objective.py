"""Training objectives of the one training loop: what a micro-batch's forward returns and its loss.

`LMObjective` is the plain next-token loss (Megatron's vocab-parallel cross entropy). The
`DistillObjective` runs the frozen teacher on the step's micro-batches first (through the same
pipeline schedule, forward only, so under PP its logits land on the last stage beside the
student's), then scores each student micro-batch by
    kd_weight * T^2 * KL(teacher || student)  +  lm_weight * cross entropy
on the vocab-parallel logits, plus `layer_weight` times the intermediate-layer losses. Those are
attached where the student layer runs (any PP stage) by an identity whose backward feeds the
loss's gradient in, the way Megatron carries MoE auxiliary losses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nemo_quant.distill.config import DistillConfig, LayerLoss
from nemo_quant.distill.kl import vocab_parallel_kl
from nemo_quant.runtime.pipeline import forward_batches, position_ids_for


class LMObjective:
    """Next-token cross entropy; the default of `train`."""

    def begin_step(self, micro_batches: list[torch.Tensor]) -> None:
        pass

    def end_step(self) -> None:
        pass

    def forward(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor):
        per_token = model(tokens, position_ids_for(tokens), None, labels=labels)

        def loss_func(output):
            loss = output.float().mean()
            return loss, {"loss": loss.detach().clone()}  # the schedule divides `loss` in place

        return per_token, loss_func


class _AddAuxLoss(torch.autograd.Function):
    """Identity on `hidden`; backward also sends gradient 1 into the (scalar) `aux` loss."""

    @staticmethod
    def forward(ctx, hidden, aux):
        ctx.aux_shape = aux.shape
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(ctx.aux_shape, dtype=torch.float32)


def layer_distance(student: torch.Tensor, teacher: torch.Tensor, kind: LayerLoss) -> torch.Tensor:
    s, t = student.float(), teacher.float()
    if LayerLoss(kind) == LayerLoss.cosine:
        return (1 - F.cosine_similarity(s, t, dim=-1)).mean()
    return F.mse_loss(s, t)


def parse_layer_pairs(pairs: list[str]) -> list[tuple[int, int]]:
    from nemo_quant.config.validate import ConfigError

    out = []
    for i, pair in enumerate(pairs):
        try:
            student, teacher = (int(p) for p in str(pair).split(":"))
        except ValueError:
            raise ConfigError(f"distill.layers[{i}]={pair!r}: write 'student_layer:teacher_layer', e.g. '10:14'.") from None
        out.append((student, teacher))
    return out


class DistillObjective:
    def __init__(self, teacher: nn.Module, cfg: DistillConfig, true_vocab: int, student: nn.Module,
                 teacher_channels: list[int] | None = None):
        """`teacher_channels`: the teacher's hidden channels the student kept (a width-pruned
        student's layers are compared with those channels of the teacher's)."""
        self.teacher, self.cfg, self.true_vocab = teacher, cfg, true_vocab
        self.channels = None if teacher_channels is None else torch.tensor(teacher_channels)
        self.teacher_logits: list[torch.Tensor] = []
        self.teacher_hidden: list[dict[int, torch.Tensor]] = []
        self.micro_batch = -1
        self.num_micro_batches = 1
        self.active = False  # layer losses attach only inside a training step
        self.pairs = parse_layer_pairs(cfg.layers)
        self._hooks = self._install_layer_hooks(student)

    def _install_layer_hooks(self, student: nn.Module) -> list:
        hooks = []
        teacher_layers = {layer.layer_number - 1: layer for layer in self.teacher.decoder.layers}
        student_layers = {layer.layer_number - 1: layer for layer in student.decoder.layers}
        for s, t in self.pairs:
            if s not in student_layers:
                continue  # on another stage (checked there)

            def record(module, args, output, t=t):
                hidden = (output[0] if isinstance(output, tuple) else output).detach()
                self.teacher_hidden[-1][t] = hidden if self.channels is None else hidden[..., self.channels]

            def attach(module, args, output, t=t):
                if not self.active:
                    return None
                hidden = output[0] if isinstance(output, tuple) else output
                aux = layer_distance(hidden, self.teacher_hidden[self.micro_batch][t], self.cfg.layer_loss)
                aux = aux * self.cfg.layer_weight / self.num_micro_batches
                hidden = _AddAuxLoss.apply(hidden, aux)
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

            hooks.append(teacher_layers[t].register_forward_hook(record))
            hooks.append(student_layers[s].register_forward_hook(attach))
        return hooks

    def begin_step(self, micro_batches: list[torch.Tensor]) -> None:
        """Teacher forward of every micro-batch's inputs; logits stay vocab-parallel."""
        self.teacher_logits, self.teacher_hidden, self.micro_batch = [], [], -1
        self.num_micro_batches = len(micro_batches)
        self.active = True
        self.teacher.eval()
        for chunk in micro_batches:
            self.teacher_hidden.append({})
            outputs = forward_batches(self.teacher, [chunk[:, :-1]], lambda out, tokens: out.detach(), num_batches=1)
            self.teacher_logits.append(outputs[0] if outputs else None)

    def forward(self, model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        self.micro_batch += 1
        i, c = self.micro_batch, self.cfg
        logits = model(tokens, position_ids_for(tokens), None)

        def loss_func(output):
            kl = vocab_parallel_kl(output, self.teacher_logits[i], c.temperature, self.true_vocab).mean()
            loss = c.kd_weight * c.temperature ** 2 * kl
            if c.lm_weight:
                ce = vocab_parallel_cross_entropy(output.float(), labels)
                loss = loss + c.lm_weight * ce.mean()
            return loss, {"loss": loss.detach().clone(), "kl": kl.detach().clone()}

        return logits, loss_func

    def end_step(self) -> None:
        self.active = False

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
