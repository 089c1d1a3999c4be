"""Logits computed batch-major, so GPTModel's final transpose copies nothing.

Megatron runs the decoder sequence-major ([s, b, h]); its output layer therefore writes the
logits as [s, b, vocab] and GPTModel returns `logits.transpose(0, 1).contiguous()`: a strided
copy of the largest tensor of the forward (400 MB for 4 x 512 tokens x 49152 fp32, measured at
1.2 s of an 8.7 s forward on one CPU thread). Transposing the hidden states instead ([s, b, h] ->
[b, s, h], vocab/hidden times smaller) makes the output GEMM write [b, s, vocab] directly; the
layer hands Megatron a [s, b, vocab] *view* of it, whose transpose back is already contiguous.
Same GEMM, same values; the vocab-parallel TP layout is unaffected (the vocab dim stays last).
Forwards with labels keep Megatron's layout: its loss views the logits flat. Not used with
sequence parallelism, whose gathers run along dim 0.
"""
from __future__ import annotations

from torch import nn


def _note_labels(model: nn.Module, args: tuple, kwargs: dict) -> None:
    # With labels, Megatron's loss views the [s, b, vocab] logits flat: keep its own layout then.
    labels = kwargs.get("labels", args[4] if len(args) > 4 else None)
    model.output_layer._nq_batch_major = labels is None


def _to_batch_major(module: nn.Module, args: tuple, kwargs: dict):
    if not getattr(module, "_nq_batch_major", False):
        return None
    hidden = args[0] if args else kwargs.pop("input_")
    return (hidden.transpose(0, 1).contiguous(), *args[1:]), kwargs


def _back_to_sequence_major(module: nn.Module, args: tuple, kwargs: dict, output):
    if not getattr(module, "_nq_batch_major", False):
        return None
    module._nq_batch_major = False
    logits, bias = output
    return logits.transpose(0, 1), bias


def install(model: nn.Module) -> None:
    head = getattr(model, "output_layer", None)
    if head is None or getattr(model.config, "sequence_parallel", False):
        return
    model.register_forward_pre_hook(_note_labels, with_kwargs=True)
    head.register_forward_pre_hook(_to_batch_major, with_kwargs=True)
    head.register_forward_hook(_back_to_sequence_major, with_kwargs=True)
