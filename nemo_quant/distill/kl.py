"""Forward KL(teacher || student) on vocab-parallel logits, never gathering the vocabulary.

Each TP rank holds a slice [.., V/tp] of both models' logits. The softmax normalisers need the
max and the sum of exponentials over the whole vocabulary: both are all-reduced over TP (max,
then sum), as Megatron's vocab-parallel cross entropy does. The per-token KL is the TP-sum of
each slice's  sum_v p_t (log p_t - log p_s).  The gradient with respect to the student's slice
is local: (p_s - p_t) / T per token. Padded vocabulary entries (beyond the true vocabulary) are
masked out of both distributions.
"""
from __future__ import annotations

import torch


def _tp():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not dist.is_initialized() or ps.get_tensor_model_parallel_world_size() == 1:
        return None, 0, 1
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()


def _all_reduce(t: torch.Tensor, op: str, group) -> torch.Tensor:
    import torch.distributed as dist

    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return t


def _log_softmax(z: torch.Tensor, group) -> torch.Tensor:
    """log softmax over the whole (TP-split) last dim."""
    m = _all_reduce(z.max(dim=-1, keepdim=True).values, "max", group)
    shifted = z - m
    total = _all_reduce(shifted.exp().sum(dim=-1, keepdim=True), "sum", group)
    return shifted - total.log()


def _masked(z: torch.Tensor, true_vocab: int | None, rank: int) -> torch.Tensor:
    if true_vocab is None:
        return z
    start = rank * z.shape[-1]
    if start + z.shape[-1] <= true_vocab:
        return z
    keep = torch.arange(start, start + z.shape[-1], device=z.device) < true_vocab
    return z.masked_fill(~keep, float("-inf"))


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, temperature, true_vocab):
        group, rank, _ = _tp()
        log_ps = _log_softmax(_masked(student.float() / temperature, true_vocab, rank), group)
        log_pt = _log_softmax(_masked(teacher.float() / temperature, true_vocab, rank), group)
        p_t = log_pt.exp()
        # 0 * (-inf - -inf) on padded entries: take p_t * (...) only where p_t > 0
        terms = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t))
        kl = _all_reduce(terms.sum(dim=-1), "sum", group)
        ctx.save_for_backward(log_ps, p_t)
        ctx.temperature, ctx.dtype = temperature, student.dtype
        return kl

    @staticmethod
    def backward(ctx, grad):
        log_ps, p_t = ctx.saved_tensors
        g = (log_ps.exp() - p_t) / ctx.temperature * grad.unsqueeze(-1)
        return g.to(ctx.dtype), None, None, None


def vocab_parallel_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0,
                      true_vocab: int | None = None) -> torch.Tensor:
    """Per-token KL(p_teacher || p_student) [...] from the local logit slices [..., V/tp]."""
    return _VocabParallelKL.apply(student, teacher.detach(), float(temperature), true_vocab)
