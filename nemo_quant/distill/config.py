"""Typed configuration of knowledge distillation (Hydra group `distill`, presets in conf/distill/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional


class LayerLoss(str, Enum):
    cosine = "cosine"  # 1 - cos(student, teacher) per token
    mse = "mse"  # mean squared difference per element


@dataclass
class DistillConfig:
    name: str = "logits"
    # Forward KL(teacher || student) of the logits at this temperature, scaled by T^2 (Hinton).
    temperature: float = 1.0
    kd_weight: float = 1.0
    lm_weight: float = 0.0  # weight of the plain next-token loss beside the KL
    # Intermediate pairs "student_layer:teacher_layer" (global 0-based decoder layers, outputs
    # compared); a depth-pruned student maps its layers to the teacher's. Both on one PP stage.
    layers: list[str] = field(default_factory=list)
    layer_loss: LayerLoss = LayerLoss.cosine
    layer_weight: float = 1.0
    # The teacher: null = the configured model (model.path) as loaded, before any mode; a
    # nemo_quant checkpoint directory (its modes replayed); or another model's path (.gguf / HF
    # directory) with the same vocabulary. Built at the job's TP/PP.
    teacher: Optional[str] = None
