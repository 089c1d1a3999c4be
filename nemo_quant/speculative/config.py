"""Typed configuration of the speculative heads (Hydra group `speculative`, presets in conf/speculative/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class Method(str, Enum):
    medusa = "medusa"  # K residual heads on the last hidden state, each with its own vocab projection
    eagle3 = "eagle3"  # low/mid/high features fused -> one decoder layer -> norm -> (draft-vocab) head
    eagle1 = "eagle1"  # last hidden state + next-token embedding -> one decoder layer -> the base's head
    mtp = "mtp"  # megatron-core's MultiTokenPredictionLayer (DeepSeek-V3 MTP) with the base's head


class TrainData(str, Enum):
    self_distilled = "self"  # the base's own greedy continuations of calibration prompts (cached)
    text = "text"  # the training windows as they are


# Mode name (what the mode state records) of each method.
MODE_OF_METHOD = {Method.medusa: "medusa", Method.eagle3: "eagle", Method.eagle1: "eagle", Method.mtp: "mtp"}


@dataclass
class SpeculativeConfig:
    name: str = "eagle3"
    method: Method = Method.eagle3
    # Medusa: number of heads (drafted tokens) and residual blocks per head.
    num_heads: int = 5
    head_layers: int = 1
    # EAGLE-3: the base decoder layers (0-based) whose outputs are fused; null = [1, L/2 - 1, L - 4]
    # ([1, 14, 26] for SmolLM2's 30 layers).
    aux_layers: Optional[list[int]] = None
    # EAGLE-3: a draft vocabulary of the most frequent training tokens (`d2t` in the export); null = full.
    draft_vocab_size: Optional[int] = None
    # EAGLE / MTP training-time test: draft steps unrolled on the draft's own features (1 = none).
    ttt_steps: int = 3
    # Loss weight of draft position i (Medusa head i, unrolled step i): step_decay ** i.
    step_decay: float = 0.8
    loss_weight: float = 1.0  # MTP's loss scale (megatron's mtp_loss_scaling_factor)
    data: TrainData = TrainData.self_distilled
    prompt_tokens: int = 128  # self-distilled data: prompt window and greedy continuation lengths
    continuation_tokens: int = 64
    # Acceptance measurement (`nemo-quant eval` of a model with heads): evaluation-text prompts of
    # prompt_tokens every eval_stride tokens, their greedy continuations of continuation_tokens.
    eval_prompts: int = 64
    eval_stride: int = 1024
    draft_lengths: list[int] = field(default_factory=lambda: [1, 3, 5])
    seed: int = 1234  # draft initialisation (identical at every TP layout)
    # Decisions recorded by the mode (not set by users): which base the heads were trained on.
    base_fingerprint: Optional[str] = None
