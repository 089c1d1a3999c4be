"""Architecture of a Llama-style decoder, independent of where its weights come from."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class LlamaArch:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    vocab_size: int
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    # Per-head width when it is not hidden_size / heads (a width-pruned model keeps its heads'
    # width while hidden size or head count shrink); None = hidden_size / heads.
    kv_channels: int | None = None

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    def parameter_count(self) -> int:
        """Parameters of the unpadded model (tied embedding counted once)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * d * (2 * self.num_attention_heads + 2 * self.num_query_groups)
        layer = 2 * h + attn + 3 * h * self.ffn_hidden_size
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return embeddings + self.num_layers * layer + h

    def check_parallel(self, tp: int, pp: int) -> None:
        """Fail early, naming the config key, when the layout cannot shard this model."""
        problems = []
        if self.num_attention_heads % tp:
            problems.append(f"num_attention_heads={self.num_attention_heads}")
        if self.num_query_groups % tp:
            problems.append(f"num_query_groups={self.num_query_groups}")
        if self.ffn_hidden_size % tp:
            problems.append(f"ffn_hidden_size={self.ffn_hidden_size}")
        if problems:
            raise ValueError(
                f"parallel.tp={tp} does not divide {', '.join(problems)}; pick a parallel.tp that does."
            )
        if self.num_layers % pp:
            raise ValueError(
                f"parallel.pp={pp} does not divide num_layers={self.num_layers}; pick a parallel.pp that does."
            )


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = 128) -> int:
    """Megatron pads the vocabulary so every TP rank holds an equal, aligned slice."""
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def arch_of_config(c, vocab_size: int = 0, **model_level) -> LlamaArch:
    """The layer shapes of a Megatron TransformerConfig (any module holds one); the model-level
    fields (vocabulary, positions, rotary base, tying) come in `model_level` or keep defaults."""
    return LlamaArch(
        num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_query_groups or c.num_attention_heads, ffn_hidden_size=c.ffn_hidden_size,
        vocab_size=vocab_size, norm_eps=c.layernorm_epsilon, **model_level,
        kv_channels=c.kv_channels if c.kv_channels != c.hidden_size // c.num_attention_heads else None,
    )


def arch_of_megatron(model, vocab_size: int) -> LlamaArch:
    """The architecture of a built Megatron GPTModel (local spec); `vocab_size` is the true,
    unpadded vocabulary, which the model itself does not keep."""
    return arch_of_config(model.config, vocab_size, max_position_embeddings=model.max_sequence_length,
                          rotary_base=float(getattr(model, "rotary_base", 10000)),
                          tie_word_embeddings=bool(model.share_embeddings_and_output_weights))


def current_arch(model, base: LlamaArch) -> LlamaArch:
    """`base` (what was loaded) with the layer shapes the model has now: a prune mode shrinks
    them in place, and exports must describe the model as it is."""
    now = arch_of_config(model.config)
    return replace(base, num_layers=now.num_layers, hidden_size=now.hidden_size,
                   num_attention_heads=now.num_attention_heads, num_query_groups=now.num_query_groups,
                   ffn_hidden_size=now.ffn_hidden_size, kv_channels=now.kv_channels)
