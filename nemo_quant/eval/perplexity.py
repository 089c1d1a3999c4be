"""Perplexity of a (possibly TP/PP/DP-sharded) Megatron GPT model on token windows.

Each window is scored on its own; NLL comes from fp32 logits over the true vocabulary
(padding dropped) and is summed in float64 (BENCHMARKS.md). Windows are split across data
parallel ranks and the sums all-reduced, so every rank returns the same figure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_quant.runtime.pipeline import data_parallel_batches, forward_batches, gather_vocab_logits
from nemo_quant.utils.progress import progress


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    predictions: int

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.predictions


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed NLL (float64) of predicting tokens[:, 1:] from full-vocab logits[:, :-1]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)
    return -picked.double().sum()


def perplexity(model: torch.nn.Module, windows: torch.Tensor, vocab_size: int, batch_size: int = 1) -> PerplexityResult:
    from megatron.core import parallel_state as ps

    batches = data_parallel_batches(windows, batch_size)
    model.eval()

    def score(output: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return window_nll(gather_vocab_logits(output, vocab_size), tokens)

    nll_sum = torch.zeros((), dtype=torch.float64)
    bar = progress(total=len(batches), desc="perplexity", unit="batch")
    # One batch per schedule call keeps memory flat and lets the bar advance.
    for batch in batches:
        for value in forward_batches(model, [batch], score, num_batches=1):
            nll_sum += value.cpu()
        bar.update(1)
    bar.close()

    # One rank per DP replica (last stage, TP rank 0) contributes its sums; all get the total.
    totals = torch.zeros(2, dtype=torch.float64)
    if ps.is_pipeline_last_stage() and ps.get_tensor_model_parallel_rank() == 0:
        totals[0] = nll_sum
        totals[1] = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(totals)
    total_nll, predictions = totals.tolist()
    return PerplexityResult(math.exp(total_nll / predictions), total_nll, int(predictions))
