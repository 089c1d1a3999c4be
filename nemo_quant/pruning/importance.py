"""Minitron importance: one calibration pass records what every prunable unit contributes.

Per decoder layer, from the inputs of its linear layers (hooks, no module conversion):
- FFN neurons: the input of `linear_fc2` (the SwiGLU output), per channel;
- attention heads: the input of `linear_proj` (the heads' outputs side by side), per head;
- embedding channels: the inputs of `linear_qkv` and `linear_fc1` (the RMSNorm outputs), summed
  over layers;
- layers: 1 - cos(input, output) of the layer's hidden states (block influence), per token.
Row-parallel inputs are all-gathered over TP (as in the quantizers' statistics pass) and the
pass runs under canonical GEMMs, so every rank at every TP sees TP=1's activations. The sums are
then reduced over DP, and each stage's layers are summed into global [layers, ...] tensors over
PP: every rank ends with the same scores, hence the same decisions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nemo_quant.distributed import dp_all_reduce, tp_all_gather, tp_all_reduce
from nemo_quant.pruning.config import ChannelScore


@dataclass
class Importance:
    """Global scores (higher = keep), identical on every rank."""

    neurons: torch.Tensor  # [layers, ffn_hidden_size]
    heads: torch.Tensor  # [layers, num_attention_heads]
    hidden: torch.Tensor  # [hidden_size]
    layers: torch.Tensor  # [layers] block influence


class _ChannelStats:
    """Float64 sums of |x| and x^2 per input channel, and the token count."""

    def __init__(self, n: int):
        self.abs = torch.zeros(n, dtype=torch.float64)
        self.sq = torch.zeros(n, dtype=torch.float64)
        self.tokens = torch.zeros(1, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).double()
        self.abs += rows.abs().sum(0)
        self.sq += rows.square().sum(0)
        self.tokens += rows.shape[0]

    def reduce_dp(self) -> None:
        for t in (self.abs, self.sq, self.tokens):
            dp_all_reduce(t, "sum")

    def mean_abs(self) -> torch.Tensor:
        return self.abs / self.tokens.clamp(min=1)

    def mean_sq(self) -> torch.Tensor:
        return self.sq / self.tokens.clamp(min=1)


class _LayerStats:
    def __init__(self, layer: nn.Module, hidden: int):
        attn, mlp = layer.self_attention, layer.mlp
        self.fc2 = _ChannelStats(mlp.linear_fc2.input_size)
        self.proj = _ChannelStats(attn.linear_proj.input_size)
        self.hidden = _ChannelStats(hidden)
        self.influence = torch.zeros(2, dtype=torch.float64)  # sum of (1 - cos), tokens

    def hooks(self, layer: nn.Module) -> list:
        def row_parallel(stats):
            return lambda module, args: stats.add(tp_all_gather(args[0], dim=-1))

        def replicated(module, args):
            self.hidden.add(args[0])

        def influence(module, args, kwargs, output):
            x_in = kwargs.get("hidden_states", args[0] if args else None)
            x_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(x_in.double(), x_out.double(), dim=-1)
            self.influence += torch.tensor([(1 - cos).sum().item(), cos.numel()], dtype=torch.float64)

        attn, mlp = layer.self_attention, layer.mlp
        return [
            mlp.linear_fc2.register_forward_pre_hook(row_parallel(self.fc2)),
            attn.linear_proj.register_forward_pre_hook(row_parallel(self.proj)),
            attn.linear_qkv.register_forward_pre_hook(replicated),
            mlp.linear_fc1.register_forward_pre_hook(replicated),
            layer.register_forward_hook(influence, with_kwargs=True),
        ]


def _column_sq_norms(weight: torch.Tensor, axis_split: int) -> torch.Tensor:
    """Squared L2 norm of every input column of a (TP-split) weight, over the whole output dim."""
    w = weight.detach().double()
    if axis_split == 1:  # row parallel: columns split, rows whole
        return tp_all_gather(w.square().sum(0), dim=0)
    return tp_all_reduce(w.square().sum(0), "sum")  # column parallel: rows split over TP


def _scores(stats: _LayerStats, layer: nn.Module, metric: ChannelScore, heads: int, head_dim: int):
    attn, mlp = layer.self_attention, layer.mlp
    if metric == ChannelScore.activation:
        neurons = stats.fc2.mean_abs()
        head = stats.proj.mean_sq().reshape(heads, head_dim).sum(1).sqrt()
        hidden = stats.hidden.mean_abs()
    else:
        neurons = (stats.fc2.mean_sq() * _column_sq_norms(mlp.linear_fc2.weight, 1)).sqrt()
        head = (stats.proj.mean_sq() * _column_sq_norms(attn.linear_proj.weight, 1)).reshape(heads, head_dim).sum(1).sqrt()
        reads = _column_sq_norms(attn.linear_qkv.weight, 0) + _column_sq_norms(mlp.linear_fc1.weight, 0)
        hidden = (stats.hidden.mean_sq() * reads).sqrt()
    return neurons, head, hidden


def measure_importance(model: nn.Module, forward_loop, metric: ChannelScore) -> Importance:
    """Run `forward_loop` once with the hooks on; collective over all ranks."""
    from megatron.core import parallel_state as ps

    from nemo_quant.quantization.forward_loop import run_forward_loop_everywhere

    c = model.config
    layers = list(model.decoder.layers)
    stats = [_LayerStats(layer, c.hidden_size) for layer in layers]
    handles = [h for s, layer in zip(stats, layers) for h in s.hooks(layer)]
    try:
        run_forward_loop_everywhere(model, forward_loop)
    finally:
        for h in handles:
            h.remove()
    total_layers, heads = c.num_layers, c.num_attention_heads
    neurons = torch.zeros(total_layers, c.ffn_hidden_size, dtype=torch.float64)
    head_scores = torch.zeros(total_layers, heads, dtype=torch.float64)
    hidden = torch.zeros(c.hidden_size, dtype=torch.float64)
    influence = torch.zeros(total_layers, dtype=torch.float64)
    for s, layer in zip(stats, layers):
        for part in (s.fc2, s.proj, s.hidden):
            part.reduce_dp()
        dp_all_reduce(s.influence, "sum")
        i = layer.layer_number - 1
        neurons[i], head_scores[i], layer_hidden = _scores(s, layer, ChannelScore(metric), heads, c.kv_channels)
        hidden += layer_hidden
        influence[i] = s.influence[0] / s.influence[1].clamp(min=1)
    if dist.is_initialized() and ps.get_pipeline_model_parallel_world_size() > 1:
        for t in (neurons, head_scores, hidden, influence):
            dist.all_reduce(t, group=ps.get_pipeline_model_parallel_group())
    return Importance(neurons.float(), head_scores.float(), hidden.float(), influence.float())
