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

from nemo_quant.distributed import tp_all_reduce, tp_rank_and_size


def _log_softmax(z: torch.Tensor) -> torch.Tensor:
    """log softmax over the whole (TP-split) last dim."""
    m = tp_all_reduce(z.max(dim=-1, keepdim=True).values, "max")
    shifted = z - m
    total = tp_all_reduce(shifted.exp().sum(dim=-1, keepdim=True), "sum")
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
        rank, _ = tp_rank_and_size()
        log_ps = _log_softmax(_masked(student.float() / temperature, true_vocab, rank))
        log_pt = _log_softmax(_masked(teacher.float() / temperature, true_vocab, rank))
        p_t = log_pt.exp()
        # 0 * (-inf - -inf) on padded entries: take p_t * (...) only where p_t > 0
        terms = torch.where(p_t > 0, p_t * (log_pt - log_ps), torch.zeros_like(p_t))
        kl = tp_all_reduce(terms.sum(dim=-1), "sum")
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
