"""Mean acceptance length (tau) of a model's speculative heads under greedy chain verification.

Ground truth: the base's greedy continuation of each prompt (cached). Because verification is
greedy, the verified tokens are exactly that continuation, and draft j of a step is accepted iff
drafts 0..j all equal it; so one base forward over prompt + continuation gives every verified
context's features, one unrolled draft pass gives every (start, step) prediction, and the loop is
replayed from that table: start n (x[n] is the last verified token), m = leading correct drafts of
the k, the step yields m + 1 tokens (the drafts and the base's bonus token), next start n + m + 1.
Only steps whose k drafts and bonus lie inside the cached continuation are counted, so an oracle
draft gives exactly k + 1. `live_speculative_decode` runs the real loop (base re-run on context +
drafts, drafts fed their own tokens) to check the replay.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class Acceptance:
    tau: dict[int, float]  # k -> mean accepted tokens per verification step (bonus included)
    accept_rate: dict[int, list[float]]  # k -> P(draft position j accepted) per step
    top1: list[float]  # unconditional top-1 of draft position j over every start
    steps: dict[int, int] = field(default_factory=dict)  # k -> verification steps counted


def correct_table(model: nn.Module, sequences: torch.Tensor, steps: int) -> torch.Tensor:
    """Bool [steps, n, seq]: entry [s, i, n] = draft step s of the chain starting after token n of
    sequence i predicts token n + s + 1 correctly (rows outside the sequence are False)."""
    from nemo_quant.speculative.base_view import base_view
    from nemo_quant.speculative.losses import hard_targets, predicted_ids
    from nemo_quant.speculative.mode import ATTR

    draft = getattr(model, ATTR)
    view = base_view(model, sequences, draft.aux_layers)
    with torch.no_grad():
        logits = draft.draft_logits(view, steps)
    target = hard_targets(view)  # [s, b]: x[p+2] at row p
    seq = sequences.shape[1]
    table = torch.zeros(steps, sequences.shape[0], seq, dtype=torch.bool)
    for s, out in enumerate(logits):
        row_ok = (predicted_ids(draft, out) == target).t()  # [b, seq] by row p
        # row p of step s belongs to the chain starting after token n = p - s + 1
        width = min(seq - 1, seq - s)
        table[s, :, 1:1 + width] = row_ok[:, s:s + width]
        table[s, :, seq - s - 1:] = False  # rows p >= seq - 2 have no target
    return table


def replay(table: torch.Tensor, prompt_len: int, k: int) -> tuple[int, int, list[int]]:
    """(tokens, steps, accepted-per-position) of greedy chain verification on one sequence's
    table [steps, seq] (see the module docstring)."""
    seq = table.shape[1]
    n, tokens, steps, accepted = prompt_len, 0, 0, [0] * k
    while n + k + 1 <= seq - 1:
        m = 0
        while m < k and bool(table[m, n]):
            m += 1
        for j in range(m):
            accepted[j] += 1
        tokens, steps, n = tokens + m + 1, steps + 1, n + m + 1
    return tokens, steps, accepted


def measure_acceptance(model: nn.Module, sequences: torch.Tensor, prompt_len: int, ks=(1, 3, 5),
                       batch_size: int = 8) -> Acceptance:
    from nemo_quant.speculative.mode import ATTR

    draft = getattr(model, ATTR)
    max_steps = min(max(ks), draft.max_steps)
    ks = sorted({min(k, max_steps) for k in ks})
    model.eval()
    tables = torch.cat([correct_table(model, batch, max_steps) for batch in sequences.split(batch_size)], dim=1)
    tau, rates, counted = {}, {}, {}
    for k in ks:
        totals = [replay(tables[:, i], prompt_len, k) for i in range(tables.shape[1])]
        tokens, steps = sum(t[0] for t in totals), sum(t[1] for t in totals)
        tau[k] = tokens / max(steps, 1)
        rates[k] = [sum(t[2][j] for t in totals) / max(steps, 1) for j in range(k)]
        counted[k] = steps
    seq = sequences.shape[1]
    top1 = [float(tables[s, :, prompt_len:seq - s - 1].float().mean()) for s in range(max_steps)]
    return Acceptance(tau=tau, accept_rate=rates, top1=top1, steps=counted)


def live_speculative_decode(model: nn.Module, prompt: torch.Tensor, total_len: int, k: int,
                            true_vocab: int) -> tuple[torch.Tensor, int, int]:
    """The real loop on one prompt [1, p]: drafts from the heads (fed their own tokens), the base
    re-run on context + drafts, the longest matching prefix accepted plus the base's token.
    Returns (tokens generated, tokens counted, steps counted) under `replay`'s counting rule."""
    from nemo_quant.runtime.pipeline import position_ids_for
    from nemo_quant.speculative.base_view import base_view
    from nemo_quant.speculative.losses import predicted_ids
    from nemo_quant.speculative.mode import ATTR
    from nemo_quant.speculative.vocab import vocab_parallel_argmax

    draft = getattr(model, ATTR)
    model.eval()

    def base_argmax(tokens):
        with torch.no_grad():
            return vocab_parallel_argmax(model(tokens, position_ids_for(tokens), None), true_vocab)[0]

    seq = torch.cat([prompt[0], base_argmax(prompt)[-1:]])
    tokens = steps = 0
    while len(seq) - 1 + k + 1 <= total_len - 1:
        n = len(seq) - 1  # x[n]: the last verified token (the previous step's bonus)
        drafts: list[int] = []
        for s in range(k):  # row n - 1 + s of block s drafts x[n + 1 + s]
            ext = torch.cat([seq, torch.tensor(drafts, dtype=seq.dtype), seq.new_zeros(k - len(drafts))])[None]
            view = base_view(model, ext, draft.aux_layers)
            with torch.no_grad():
                logits = draft.draft_logits(view, s + 1, [view.next_tokens()] * (s + 1))
            drafts.append(int(predicted_ids(draft, logits[s])[n - 1 + s, 0]))
        verify = base_argmax(torch.cat([seq, torch.tensor(drafts, dtype=seq.dtype)])[None])
        m = 0
        while m < k and drafts[m] == int(verify[n + m]):
            m += 1
        seq = torch.cat([seq, torch.tensor(drafts[:m], dtype=seq.dtype), verify[n + m:n + m + 1]])
        tokens, steps = tokens + m + 1, steps + 1
    return seq, tokens, steps
