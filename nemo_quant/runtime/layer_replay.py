"""Layer-by-layer passes over calibration data, for methods that must see what the layers
before them already became (sequential SparseGPT-style pruning).

The calibration forward runs once per pipeline stage, only to record what reaches the
stage's first decoder layer (its call arguments, per micro-batch; the stage's own layers and
those after it are skipped meanwhile, so at PP=1 the recording costs only the embedding);
from there each layer is
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


def record_stage_inputs(model: nn.Module, forward_loop: Callable[[nn.Module], None], skip_layers: bool) -> LayerCalls:
    """Every call's arguments of this stage's first decoder layer during one calibration pass
    (all ranks run the pass). `skip_layers`: this stage's layers pass their input through
    meanwhile (the recording needs only what reaches them; stages that feed later stages
    keep computing)."""
    from nemo_quant.quantization.forward_loop import run_forward_loop_everywhere

    layers = list(model.decoder.layers)
    calls: LayerCalls = []

    def hook(module, args, kwargs):
        if args:
            raise RuntimeError(f"{type(module).__name__} was called with positional arguments; the layer replay "
                               "expects Megatron's keyword call (hidden_states=..., attention_mask=..., ...)")
        calls.append({k: _detached(v) for k, v in kwargs.items()})

    def passthrough(*args, **kwargs):
        return kwargs["hidden_states"], kwargs.get("context")

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    if skip_layers:
        for layer in layers:
            layer.forward = passthrough
    try:
        run_forward_loop_everywhere(model, forward_loop)
    finally:
        handle.remove()
        if skip_layers:
            for layer in layers:
                del layer.forward  # back to the class's forward
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
