"""Typed configuration of the prune mode (Hydra group `prune`, presets in conf/prune/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional


class ChannelScore(str, Enum):
    # Minitron: the mean |activation| of a neuron / head / embedding channel over batch and sequence.
    activation = "activation"
    # What the channel adds to the layer's output: RMS activation times the norm of the weights that
    # read it (fc2 / proj columns; for embedding channels the qkv and fc1 columns).
    output = "output"


class LayerScore(str, Enum):
    block_influence = "block_influence"  # 1 - cos(layer input, layer output), averaged over tokens
    skip_loss = "skip_loss"  # calibration loss with the layer skipped (one forward per layer)
    # Greedy: drop the layer whose skipping raises the calibration loss least, given the layers
    # already dropped, until the target depth (sum over the dropped counts of the remaining layers).
    iterative_skip_loss = "iterative_skip_loss"


@dataclass
class PruneTarget:
    """Sizes after pruning; null keeps a dimension. `params` asks the search for the sizes."""

    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    hidden_size: Optional[int] = None
    num_layers: Optional[int] = None
    params: Optional[float] = None  # parameter budget (e.g. 100e6); the unset dimensions are searched


@dataclass
class PruneSearch:
    """How `target.params` is met: candidate sizes within `tolerance` below the budget, ranked by the
    importance they drop, the best `candidates` scored by their calibration loss (masked, exact)."""

    tolerance: float = 0.02
    candidates: int = 8
    windows: int = 4  # calibration windows per candidate's loss
    ffn_step: int = 64  # allowed ffn_hidden_size: multiples of this (and of TP)
    hidden_step: int = 64
    min_fraction: float = 0.5  # no dimension below this fraction of the model's
    # Only sizes whose hidden_size divides by the head count: transformers' LlamaConfig refuses
    # the others even with an explicit head_dim (vLLM and TensorRT-LLM read head_dim).
    transformers_loadable: bool = True


@dataclass
class PruneConfig:
    name: str = "minitron"
    target: PruneTarget = field(default_factory=PruneTarget)
    # Defaults measured on SmolLM2 (benchmarks/results/pruning.md): `output` beats Minitron's
    # activation score at FFN 1536 -> 1024, skip-loss beats block influence at 30 -> 22 layers.
    channel_score: ChannelScore = ChannelScore.output
    layer_score: LayerScore = LayerScore.skip_loss
    skip_loss_windows: int = 4  # calibration windows per loss of the skip-loss layer scores
    search: PruneSearch = field(default_factory=PruneSearch)
    # The decisions (kept indices, sizes), written by the mode after its data step and replayed
    # from checkpoints; not for users to set.
    plan: Optional[dict[str, Any]] = None
