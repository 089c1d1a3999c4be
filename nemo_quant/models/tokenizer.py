"""Build a `tokenizers` BPE tokenizer from the vocabulary and merges stored in a GGUF file."""
from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp pre-tokenizer names -> whether digits are split one by one before byte-level BPE.
_SPLIT_DIGITS = {"smollm": True, "starcoder": True, "default": False, "gpt-2": False}
_CONTROL = 3  # gguf TokenType.CONTROL


def tokenizer_from_gguf(path: str | Path) -> Tokenizer:
    from gguf import GGUFReader

    reader = GGUFReader(Path(path))
    fields = reader.fields
    model_kind = fields["tokenizer.ggml.model"].contents()
    if model_kind != "gpt2":
        raise ValueError(f"{path}: tokenizer model {model_kind!r} is not supported (byte-level BPE 'gpt2' only)")
    pre = fields["tokenizer.ggml.pre"].contents() if "tokenizer.ggml.pre" in fields else "default"
    if pre not in _SPLIT_DIGITS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported ({sorted(_SPLIT_DIGITS)})")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    # A vocabulary of single bytes needs no merges, and GGUF writers then omit the key.
    raw_merges = fields["tokenizer.ggml.merges"].contents() if "tokenizer.ggml.merges" in fields else []
    merges = [tuple(m.split(" ", 1)) for m in raw_merges]
    types = fields["tokenizer.ggml.token_type"].contents()

    return byte_level_bpe(tokens, merges, types, _SPLIT_DIGITS[pre])


def byte_level_bpe(tokens: list[str], merges: list[tuple[str, str]], token_types: list[int], split_digits: bool) -> Tokenizer:
    """GPT-2 style byte-level BPE; control tokens (type 3) become special tokens."""
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, token_types, strict=True) if ty == _CONTROL])
    return tok
