"""Training-time test: several draft steps computed for every start position at once.

Block s of an unrolled pass holds draft step s of every chain. Row p of block s is the step-s
draft of the chain that starts after the verified token at p - s + 1; it sits at sequence
position p, consumes token x[p+1] (the true token: greedy chain verification accepts a draft
only when every earlier draft of its chain was right, so feeding true tokens gives the same
acceptance as feeding the draft's own), reads the step s-1 output of row p-1 as its feature,
and predicts x[p+2]. Its attention sees what a real draft loop's KV cache holds: the
teacher-forced block-0 keys up to p - s (the verified context) and, of each block t = 1..s,
the one key of its own chain (row p - s + t).
"""
from __future__ import annotations

import torch


def unroll_mask(seq: int, blocks: int, device=None) -> torch.Tensor:
    """[blocks*seq, blocks*seq] boolean mask over the concatenated blocks; True = masked
    (Megatron's convention)."""
    q = torch.arange(seq, device=device)
    keep = torch.zeros(blocks, seq, blocks, seq, dtype=torch.bool, device=device)
    for a in range(blocks):
        keep[a, :, 0, :] = q[None, :] <= (q[:, None] - a)
        for b in range(1, a + 1):
            keep[a, :, b, :] = q[None, :] == (q[:, None] - a + b)
    return ~keep.reshape(blocks * seq, blocks * seq)


def shift_down(x: torch.Tensor) -> torch.Tensor:
    """[s, b, ...] -> row p holds row p-1 (row 0 zeros): a chain's previous step output."""
    return torch.cat([torch.zeros_like(x[:1]), x[:-1]], dim=0)


def valid_rows(seq: int, step: int, device=None) -> torch.Tensor:
    """Rows of block `step` that are a real chain step with a target: step <= p <= seq - 2."""
    p = torch.arange(seq, device=device)
    return (p >= step) & (p <= seq - 2)


def run_unrolled(layer_fn, first_hidden: torch.Tensor, embeds: list[torch.Tensor], steps: int,
                 carry=lambda out: out) -> list[torch.Tensor]:
    """Outputs [s, b, h] of blocks 0..steps-1.

    `layer_fn(hidden, embeds, mask)` runs the draft layer over concatenated blocks ([n*s, b, h]
    each) under `mask`; `embeds[t]` are the token embeddings block t consumes; `carry(out)` is
    what a step hands the next one as its feature."""
    seq = first_hidden.shape[0]
    hidden_blocks, outputs = [first_hidden], []
    for step in range(steps):
        mask = unroll_mask(seq, step + 1, first_hidden.device)[None, None]
        out = layer_fn(torch.cat(hidden_blocks, 0), torch.cat(embeds[: step + 1], 0), mask)
        outputs.append(out[step * seq:])
        hidden_blocks.append(shift_down(carry(outputs[-1])))
    return outputs
