"""Typed configuration of the qlora mode (Hydra group `qlora`, presets in conf/qlora/)."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class BaseFormat(str, Enum):
    nf4 = "nf4"  # packed NF4 with double quantization, bitsandbytes' bytes (QLoRA)
    none = "none"  # the base stays as loaded (model.dtype), frozen: plain LoRA


class AdapterInit(str, Enum):
    standard = "standard"  # A ~ Kaiming-uniform, B = 0 (PEFT's default): the model starts as the base
    # A, B from the rank-r SVD of the quantization residual W - dequant(NF4(W)) (LoftQ, one step):
    # the model starts closer to the unquantized weights.
    loftq = "loftq"


class AdapterDType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"


@dataclass
class QLoRAConfig:
    name: str = "nf4"
    base_format: BaseFormat = BaseFormat.nf4
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    # fnmatch patterns on Megatron module names (layer numbers counted over the whole pipeline)
    # of the Column/RowParallelLinear layers that get an adapter (and an NF4 base); each pattern
    # must match at least one layer.
    targets: list[str] = field(default_factory=lambda: ["decoder.layers.*"])
    init: AdapterInit = AdapterInit.standard
    adapter_dtype: AdapterDType = AdapterDType.float32
    seed: int = 0  # adapter initialisation (the same on every rank) and dropout masks

    @property
    def scaling(self) -> float:
        return self.alpha / (self.rank ** 0.5 if self.rslora else self.rank)
