"""Forward-only passes through Megatron's pipeline schedule, at any TP/PP.

`forward_batches` feeds micro-batches to the model through
`megatron.core.pipeline_parallel.get_forward_backward_func()`, so PP stages exchange
activations exactly as in training. On the last stage each output goes through `on_output`
(e.g. to turn TP-sharded logits into a loss); other stages return nothing.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

import torch


def gather_vocab_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """TP-sharded logits [b, s, V/tp] -> full logits [b, s, vocab_size] (padding dropped)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size]


@contextmanager
def logits_skipped(model: torch.nn.Module) -> Iterator[bool]:
    """Passes that only need what reaches the decoder's layers (calibration statistics) skip the
    output layer: its vocab GEMM is a fifth of a SmolLM2 forward. The model then returns empty
    logits. Not applied when the output layer is quantized or observed (its input matters);
    yields whether it was applied."""
    head = getattr(model, "output_layer", None)
    if head is None or hasattr(head, "weight_quantizer") or getattr(head, "_nq_observer", None) is not None:
        yield False
        return

    def empty_logits(input_, *args, **kwargs):
        return input_.new_empty(*input_.shape[:-1], 0), None

    head.forward = empty_logits
    try:
        yield True
    finally:
        del head.forward  # back to the class's forward


def data_parallel_batches(windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """This DP rank's share of `windows` (every window goes to exactly one rank), in batches.

    A rank may get none when there are fewer windows than replicas."""
    from megatron.core import parallel_state as ps

    mine = windows[ps.get_data_parallel_rank()::ps.get_data_parallel_world_size()]
    return list(mine.split(batch_size)) if mine.shape[0] else []


def position_ids_for(tokens: torch.Tensor) -> torch.Tensor:
    return torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand_as(tokens)


def forward_batches(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    on_output: Callable[[torch.Tensor, torch.Tensor], Any],
    num_batches: int,
) -> list[Any]:
    """Run each token batch [b, s] forward; returns `on_output(output, tokens)` per batch on the last stage."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(batches)
    if not batches:
        return []
    micro_batch, seq_length = batches[0].shape
    device = next(model.parameters()).device

    def forward_step(data_iterator, model_chunk):
        tokens = next(data_iterator).to(device)
        output = model_chunk(tokens, position_ids_for(tokens), None)

        def collect(output_tensor, non_loss_data=False):
            return on_output(output_tensor, tokens)

        return output, collect

    with torch.no_grad():
        return get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(batches),
            model=[model],
            num_microbatches=num_batches,
            seq_length=seq_length,
            micro_batch_size=micro_batch,
            forward_only=True,
            collect_non_loss_data=True,
        )
