"""Layer-by-layer passes over calibration data, for methods that must see what the layers
before them already became (sequential SparseGPT-style pruning).

The calibration forward runs once per pipeline stage, only to record what reaches the
stage's first decoder layer (its call arguments, per micro-batch); from there each layer is
replayed on the recorded inputs, changed, and replayed again to produce the next layer's
inputs. Stage s records after stages < s have finished, so it sees their changed outputs.
Replays run in canonical-shard GEMMs (runtime/canonical_gemms.py): activations are the same
at every TP, so decisions taken on them are too.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from nemo_quant.runtime.canonical_gemms import canonical_gemms

LayerCalls = list[dict[str, Any]]  # one keyword-argument dict per recorded micro-batch


def _detached(value: Any) -> Any:
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def record_layer_inputs(model: nn.Module, layer: nn.Module, forward_loop: Callable[[nn.Module], None]) -> LayerCalls:
    """Every call's arguments of `layer` during one calibration pass (all ranks run the pass)."""
    from nemo_quant.quantization.forward_loop import run_forward_loop_everywhere

    calls: LayerCalls = []

    def hook(module, args, kwargs):
        if args:
            raise RuntimeError(f"{type(module).__name__} was called with positional arguments; the layer replay "
                               "expects Megatron's keyword call (hidden_states=..., attention_mask=..., ...)")
        calls.append({k: _detached(v) for k, v in kwargs.items()})

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        run_forward_loop_everywhere(model, forward_loop)
    finally:
        handle.remove()
    return calls


def replay(model: nn.Module, layer: nn.Module, calls: LayerCalls) -> LayerCalls:
    """Run `layer` on each recorded call; returns the calls the next layer receives."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), canonical_gemms(model):
            return [{**call, "hidden_states": layer(**call)[0]} for call in calls]
    finally:
        model.train(was_training)
