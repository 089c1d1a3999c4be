"""Calibration and evaluation windows from a data config (the Austen corpus or the user's files)."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from tokenizers import Tokenizer

from nemo_quant.data import austen
from nemo_quant.data.text_files import join_documents, read_documents
from nemo_quant.data.windows import token_windows


def _text(data: DictConfig, split: str) -> str:
    if data.name == "austen":
        return austen.calibration_text() if split == "calibration" else austen.evaluation_text()
    key = "calib_files" if split == "calibration" else "eval_files"
    return join_documents(read_documents(list(data[key]), data.jsonl_field, key=f"data.{key}"))


def _windows(data: DictConfig, tokenizer: Tokenizer, split: str, count: int) -> torch.Tensor:
    # No BOS/EOS anywhere (BENCHMARKS.md); the whole split is tokenized in one go.
    ids = tokenizer.encode(_text(data, split), add_special_tokens=False).ids
    return token_windows(ids, count, data.seq_length, what=split)


def calibration_windows(data: DictConfig, tokenizer: Tokenizer) -> torch.Tensor:
    return _windows(data, tokenizer, "calibration", data.calib_samples)


def evaluation_windows(data: DictConfig, tokenizer: Tokenizer) -> torch.Tensor:
    return _windows(data, tokenizer, "evaluation", data.eval_samples)


def training_windows(data: DictConfig, train: DictConfig, tokenizer: Tokenizer) -> torch.Tensor:
    """Windows of train.seq_length + 1 tokens (inputs and shifted labels) from the calibration text."""
    ids = tokenizer.encode(_text(data, "calibration"), add_special_tokens=False).ids
    available = len(ids) // (train.seq_length + 1)
    count = min(available, train.max_train_windows) if train.max_train_windows else available
    return token_windows(ids, max(count, 1), train.seq_length + 1, what="training")


def strided_prompts(data: DictConfig, tokenizer: Tokenizer, split: str, count: int, length: int,
                    stride: int) -> torch.Tensor:
    """[count, length] prompts, prompt i starting at token stride * i of the split (BENCHMARKS.md's
    speculative prompts: 64 x 128 tokens of Persuasion at 1024 * i); fewer when the text runs out."""
    ids = torch.as_tensor(tokenizer.encode(_text(data, split), add_special_tokens=False).ids, dtype=torch.int64)
    starts = [stride * i for i in range(count) if stride * i + length <= ids.numel()]
    if not starts:
        raise ValueError(f"{split}: {ids.numel()} tokens hold no prompt of {length} tokens.")
    return torch.stack([ids[s:s + length] for s in starts])
