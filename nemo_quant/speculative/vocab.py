"""EAGLE-3's reduced draft vocabulary and the vocab-parallel slices that go with it.

`draft_ids[i]` is the base token id of draft token i (sorted ascending; the export writes
`d2t[i] = draft_ids[i] - i`). Draft logits are vocab-parallel over the (padded) draft vocabulary;
the base's are vocab-parallel over its own, so the base logits of the draft tokens are picked
on the rank that holds them and summed over TP: a [.., draft vocab] tensor, never the full
vocabulary.
"""
from __future__ import annotations

import torch


def most_frequent_tokens(windows: torch.Tensor, size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent ids in `windows` (ties to the lower id), sorted ascending; ids
    never seen fill up by id order so the set always has `size` members."""
    counts = torch.bincount(windows.reshape(-1).long(), minlength=vocab)[:vocab].double()
    order = torch.argsort(-counts - torch.arange(vocab, dtype=torch.float64) / (2 * vocab), stable=True)
    return torch.sort(order[:size]).values


def pick_columns(local: torch.Tensor, ids: torch.Tensor, padded: int) -> torch.Tensor:
    """Columns `ids` (global base ids) of the vocab-parallel `local` [..., V/tp] -> this rank's
    slice [..., padded/tp] of the draft-vocabulary tensor (zeros in the padding)."""
    from nemo_quant.distributed import tp_all_reduce, tp_rank_and_size

    rank, tp = tp_rank_and_size()
    width = local.shape[-1]
    lo = rank * width
    full = local.new_zeros(*local.shape[:-1], padded)
    mine = (ids >= lo) & (ids < lo + width)
    full[..., mine.nonzero().squeeze(1)] = local[..., ids[mine] - lo]
    tp_all_reduce(full, "sum")
    per_rank = padded // tp
    return full[..., rank * per_rank:(rank + 1) * per_rank]


def pick_rows(local_weight: torch.Tensor, ids: torch.Tensor, padded: int) -> torch.Tensor:
    """Rows `ids` of a vocab-parallel weight [V/tp, h] -> this rank's [padded/tp, h] slice."""
    return pick_columns(local_weight.t(), ids, padded).t().contiguous()


def vocab_parallel_argmax(local: torch.Tensor, true_vocab: int | None = None) -> torch.Tensor:
    """Global argmax ids of vocab-parallel logits [..., V/tp] (padding excluded; ties -> lowest id)."""
    from nemo_quant.distributed import tp_all_reduce, tp_rank_and_size

    rank, tp = tp_rank_and_size()
    width = local.shape[-1]
    ids = torch.arange(rank * width, (rank + 1) * width, device=local.device)
    x = local.float()
    if true_vocab is not None:
        x = x.masked_fill(ids >= true_vocab, float("-inf"))
    best, index = x.max(dim=-1)
    if tp == 1:
        return index
    top = tp_all_reduce(best.clone(), "max")
    candidate = torch.where(best == top, index + rank * width, torch.full_like(index, 2 ** 62))
    return -tp_all_reduce(-candidate, "max")  # min over ranks
