"""Build a Megatron-core GPTModel (local spec) for a Llama-style architecture."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nemo_quant.models.arch import LlamaArch, padded_vocab_size


def transformer_config(arch: LlamaArch, tp: int, pp: int, dtype: torch.dtype = torch.float32):
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        ffn_hidden_size=arch.ffn_hidden_size,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        init_method_std=0.02,
    )


def layer_spec(core_attention: str = "sdpa"):
    """Megatron's local (Transformer-Engine-free) layer spec with RMSNorm; core attention through
    PyTorch's SDPA ("sdpa", see sdpa_attention.py) or Megatron's own unfused one ("megatron")."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    if core_attention == "sdpa":
        from nemo_quant.models.sdpa_attention import SDPADotProductAttention

        spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    elif core_attention != "megatron":
        raise ValueError(f"core_attention={core_attention!r}: choose 'sdpa' or 'megatron'.")
    return spec


def true_vocab_size(model) -> int:
    """The unpadded vocabulary of a model built here (Megatron keeps only the padded size)."""
    return getattr(model, "_nq_true_vocab", None) or model.vocab_size


def build_gpt_model(arch: LlamaArch, dtype: torch.dtype = torch.float32, core_attention: str = "sdpa"):
    """Build this rank's shard of the model; model-parallel state must be initialised."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    arch.check_parallel(tp, pp)
    config = transformer_config(arch, tp, pp, dtype)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(core_attention),
        vocab_size=padded_vocab_size(arch.vocab_size, tp),
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
    )
    model._nq_true_vocab = arch.vocab_size  # Megatron keeps only the padded size
    if model.post_process:
        from nemo_quant.models import batch_major_logits

        batch_major_logits.install(model)
    if torch.cuda.is_available():
        model = model.cuda()
    return model
