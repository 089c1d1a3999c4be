"""Run the unpruned model as if a plan were applied, without touching its weights.

Used to score candidates (the parameter-budget search, skip-loss layer importance): zeroing a
neuron's or head's output removes it exactly; a skipped layer passes its input through; dropped
embedding channels are zeroed in the residual stream and every RMSNorm output is rescaled by
sqrt(kept / hidden) so it normalises over the kept channels as the pruned model's would (exact up
to the norm's epsilon). One forward per candidate instead of a copy and a surgery.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from nemo_quant.distributed import tp_rank_and_size
from nemo_quant.models.megatron_layout import cols


def _local_mask(kept: list[int], total: int, repeat: int = 1) -> torch.Tensor:
    mask = torch.zeros(total)
    mask[kept] = 1.0
    rank, tp = tp_rank_and_size()
    return cols(mask.repeat_interleave(repeat).unsqueeze(0), rank, tp)[0]


def identity_plan(config, skip: tuple[int, ...] = ()) -> dict:
    """Everything kept but the layers in `skip`: the view of skipped layers."""
    c = config
    layers = [i for i in range(c.num_layers) if i not in skip]
    return {"layers": layers, "hidden": list(range(c.hidden_size)),
            "ffn": [list(range(c.ffn_hidden_size))] * len(layers),
            "heads": [list(range(c.num_attention_heads))] * len(layers)}


@contextmanager
def masked_view(model: nn.Module, plan: dict):
    c = model.config
    hidden_mask = torch.zeros(c.hidden_size)
    hidden_mask[plan["hidden"]] = 1.0
    norm_scale = (len(plan["hidden"]) / c.hidden_size) ** 0.5  # 1/rms over H -> over the kept H'
    kept = {g: j for j, g in enumerate(plan["layers"])}

    def times(mask):
        def hook(module, args):
            return (args[0] * mask.to(args[0].dtype), *args[1:])
        return hook

    def residual(module, args, output):
        if isinstance(output, tuple):
            return (output[0] * hidden_mask.to(output[0].dtype), *output[1:])
        return output * hidden_mask.to(output.dtype)

    def norm(module, args, output):
        return output * (hidden_mask * norm_scale).to(output.dtype)

    def skipped(module, args, kwargs, output):
        return (kwargs.get("hidden_states", args[0] if args else None), *output[1:])

    handles = []
    try:
        if getattr(model, "pre_process", False):
            handles.append(model.embedding.register_forward_hook(residual))
        if getattr(model, "post_process", False):
            handles.append(model.decoder.final_layernorm.register_forward_hook(norm))
        for layer in model.decoder.layers:
            g = layer.layer_number - 1
            if g not in kept:
                handles.append(layer.register_forward_hook(skipped, with_kwargs=True))
                continue
            j, attn, mlp = kept[g], layer.self_attention, layer.mlp
            handles += [
                mlp.linear_fc2.register_forward_pre_hook(times(_local_mask(plan["ffn"][j], c.ffn_hidden_size))),
                attn.linear_proj.register_forward_pre_hook(
                    times(_local_mask(plan["heads"][j], c.num_attention_heads, c.kv_channels))),
                mlp.linear_fc2.register_forward_hook(residual),
                attn.linear_proj.register_forward_hook(residual),
                layer.input_layernorm.register_forward_hook(norm),
                layer.pre_mlp_layernorm.register_forward_hook(norm),
            ]
        yield
    finally:
        for h in handles:
            h.remove()


def masked_loss(model: nn.Module, plan: dict, windows: torch.Tensor) -> float:
    """Mean calibration NLL of the model viewed through `plan` (every rank gets the same value)."""
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.builder import true_vocab_size

    with masked_view(model, plan):
        return perplexity(model, windows, true_vocab_size(model)).mean_nll
