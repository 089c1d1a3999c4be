"""Stream a TP/PP-sharded Megatron GPTModel to the writer rank (global rank 0), layer by layer.

Each piece arrives in the TP=1 layout Megatron would have built in one process, so the
writers never see a parallel layout:
- every TP-split tensor is all-gathered over its tensor-parallel group along its split axis
  (Megatron's `partition_dim` for parameters, `amax_tp_axis` for quantizer scales, the
  input dim for a row-parallel layer's pre-quant scale);
- gated fc1 rows come as [gate_r; up_r] per rank and are reordered into [gate; up];
- the vocabulary padding is cut off.
Only data-parallel replica 0 takes part (replicas are identical). The tensor-parallel rank 0
of each pipeline stage sends its layers to rank 0 in order, one at a time, so rank 0 holds
one layer beyond its own shard at any moment.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.distributed as dist

from nemo_quant.distributed import recv_object, send_object, tp_all_gather
from nemo_quant.models.megatron_layout import fc1_rows_in_tp1_order
from nemo_quant.quantization.config import QuantizerSpec


@dataclass
class LayerPiece:
    """One decoder layer (global index), full tensors keyed by Megatron names within the layer."""

    index: int
    tensors: dict[str, torch.Tensor]
    # Linear name within the layer -> (weight spec, input spec); kv_spec: the K/V cache quantizer.
    specs: dict[str, tuple[QuantizerSpec | None, QuantizerSpec | None]] = field(default_factory=dict)
    kv_spec: QuantizerSpec | None = None


def _tp():
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_world_size()


def _gather(t: torch.Tensor, axis: int | None) -> torch.Tensor:
    # read-only from here on: no copy where nothing is gathered
    return t.detach() if axis is None else tp_all_gather(t.detach(), axis)


def _tp_axis(owner: torch.nn.Module, name: str, t: torch.Tensor) -> int | None:
    from nemo_quant.quantization.tensor_quantizer import TensorQuantizer

    if isinstance(owner, TensorQuantizer):
        return owner.amax_tp_axis
    if hasattr(owner, "tp_axis_map") and name not in ("weight", "bias"):
        return owner.tp_axis_map().get(name)  # a mode's per-row / per-column tensors (masks, scales)
    return getattr(t, "partition_dim", None) if getattr(t, "tensor_model_parallel", False) else None


def gather_module(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` (a decoder layer), TP-gathered; collective over TP."""
    out = {}
    for mod_name, owner in module.named_modules():
        own = list(owner.named_parameters(recurse=False)) + list(owner.named_buffers(recurse=False))
        for name, t in own:
            key = f"{mod_name}.{name}" if mod_name else name
            axis = _tp_axis(owner, name, t)
            full = _gather(t, axis)
            if axis == 0 and key.startswith("mlp.linear_fc1.") and _gated(module):
                full = fc1_rows_in_tp1_order(full, _tp()[1])
            out[key] = full
    return out


def _gated(layer) -> bool:
    return bool(getattr(layer.config, "gated_linear_unit", False))


def layer_specs(layer) -> tuple[dict, QuantizerSpec | None]:
    specs, kv = {}, None
    for name, module in layer.named_modules():
        if hasattr(module, "weight_quantizer"):
            specs[name] = tuple(q.spec if q is not None else None for q in (module.weight_quantizer, module.input_quantizer))
        elif hasattr(module, "weight") and isinstance(getattr(module, "weight"), torch.Tensor) and module.weight.ndim == 2:
            specs[name] = (None, None)
        if hasattr(module, "k_quantizer"):
            kv = module.k_quantizer.spec
    return specs, kv


def _writer_and_owners() -> tuple[bool, bool, list[int]]:
    """(this rank takes part, this rank is a stage's sender, global ranks of stages 0..pp-1)."""
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return True, True, [0]
    takes_part = ps.get_data_parallel_rank() == 0
    sender = takes_part and ps.get_tensor_model_parallel_rank() == 0
    # Rank 0's pipeline group is the (TP 0, DP 0) rank of every stage, in stage order.
    stage_ranks = [None] * ps.get_pipeline_model_parallel_world_size()
    if sender:
        stage_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    return takes_part, sender, stage_ranks


def stream_model(model, vocab_size: int) -> Iterator[tuple[str, object]]:
    """Collective over the model's ranks: every rank must exhaust it. On rank 0 it yields
    ("embedding", t), then ("layer", LayerPiece) for every layer in global order, then
    ("head", (final norm, output weight or None when tied)); other ranks yield nothing."""
    from megatron.core import parallel_state as ps

    takes_part, sender, stage_ranks = _writer_and_owners()
    rank = dist.get_rank() if dist.is_initialized() else 0
    pp = len(stage_ranks)
    stage = ps.get_pipeline_model_parallel_rank() if dist.is_initialized() else 0
    layers = list(model.decoder.layers)
    if not takes_part:
        return
    if stage == 0:
        emb = _gather(model.embedding.word_embeddings.weight, 0)[:vocab_size]
        if rank == 0:
            yield "embedding", emb
    if rank != 0:  # rank 0 (stage 0) gathers its own layers below, one at a time, as it yields them
        for layer in layers:
            piece = _piece(layer)
            if sender:
                send_object(piece, 0)
    else:
        for s in range(pp):
            for layer in layers:
                yield "layer", _piece(layer) if s == 0 else recv_object(stage_ranks[s])
    if stage == pp - 1:
        head = _head(model, vocab_size)
        if rank == 0:
            yield "head", head
        elif sender:
            send_object(head, 0)
    elif rank == 0:
        yield "head", recv_object(stage_ranks[-1])


def _piece(layer) -> LayerPiece:
    specs, kv = layer_specs(layer)
    return LayerPiece(layer.layer_number - 1, gather_module(layer), specs, kv)


def _head(model, vocab_size: int):
    norm = model.decoder.final_layernorm.weight.detach()
    output = None
    if not model.share_embeddings_and_output_weights:
        output = _gather(model.output_layer.weight, 0)[:vocab_size]
    return norm, output
