"""Sharded TensorRT-LLM checkpoint (`config.json` + `rank{N}.safetensors`) for TensorRT-LLM
<= 1.2 engine builds (`trtllm-build`). Spec: checkpoint-formats.md sections 1-3.

Split rules at inference TP = t, PP = p (rank = tp_rank + pp_rank * t):
- attention.qkv: rank r holds cat(q heads of r, k heads of r, v heads of r); with fewer KV
  heads than t, each rank gets one KV head (heads duplicated, config keeps the true count);
- attention.dense / mlp.proj (row parallel): input columns split, block scales with them;
- mlp.fc = gate_proj rows, mlp.gate = up_proj rows, split by rows;
- vocab_embedding (first stage) and lm_head (last stage): rows zero-padded to a multiple of
  t, then split; ln_f on the last stage; layers renumbered from 0 on every stage.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from nemo_quant.export.formats import ExportError, ExportFormat, QuantizedLinear, cat_rows, pack_e2m1, pack_int4_rows
from nemo_quant.export.hf_layout import HFLayer
from nemo_quant.export.quant_summary import QuantSummary
from nemo_quant.export.safetensors_writer import SafetensorsFile
from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.loading import DTYPE_NAMES

ARCHITECTURES = ("LlamaForCausalLM", "GPTForCausalLM")


def trtllm_linear_tensors(ql: QuantizedLinear, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    f = ql.fmt
    if f == ExportFormat.none:
        return {"weight": ql.weight.to(dtype)}
    if f == ExportFormat.w8a16:
        raise ExportError("int8 weight-only (W8A16) has no TensorRT-LLM checkpoint layout here; use export.format=hf.")
    out: dict[str, torch.Tensor] = {}
    if f in (ExportFormat.w4a16_awq, ExportFormat.w4a8_awq):
        out["weight"] = pack_int4_rows(ql.weight).view(torch.int8)  # same bytes, int8 view (as ModelOpt)
    elif f == ExportFormat.nvfp4:
        out["weight"] = pack_e2m1(ql.weight)
    else:
        out["weight"] = ql.weight
    scalar = (lambda t: t.reshape(())) if f == ExportFormat.nvfp4 else (lambda t: t.reshape(1))  # noqa: E731
    out["weights_scaling_factor"] = ql.weight_scale.reshape(1) if ql.weight_scale.ndim == 0 else ql.weight_scale
    if ql.weight_scale_2 is not None:
        out["weights_scaling_factor_2"] = scalar(ql.weight_scale_2)
    if ql.input_scale is not None:
        out["activation_scaling_factor"] = scalar(ql.input_scale)
    if ql.pre_quant_scale is not None:
        out["prequant_scaling_factor"] = ql.pre_quant_scale.to(dtype)
    return out


def check_architecture(architecture: str) -> None:
    if architecture == "GPTForCausalLM":
        # TensorRT-LLM's GPT decoder builds LayerNorm (with bias) norms; our models are
        # RMSNorm + SwiGLU + RoPE, which its Llama decoder builds (ModelOpt maps them the same way).
        raise ExportError("export.trtllm_architecture=GPTForCausalLM: TensorRT-LLM's GPT decoder uses LayerNorm "
                          "with bias, but this model uses RMSNorm; use LlamaForCausalLM (the default).")
    if architecture not in ARCHITECTURES:
        raise ExportError(f"export.trtllm_architecture={architecture!r}; choose one of {', '.join(ARCHITECTURES)}.")


def check_layout(arch: LlamaArch, tp: int, pp: int) -> None:
    """Fail before any work when the inference layout cannot shard the model."""
    nh, nkv = arch.num_attention_heads, arch.num_query_groups
    problems = []
    if nh % tp:
        problems.append(f"num_attention_heads={nh} is not divisible by export.inference_tp={tp}")
    if nkv % tp and tp % nkv:
        problems.append(f"num_key_value_heads={nkv} and export.inference_tp={tp}: one must divide the other")
    if arch.ffn_hidden_size % tp:
        problems.append(f"intermediate_size={arch.ffn_hidden_size} is not divisible by export.inference_tp={tp}")
    if arch.num_layers % pp:
        problems.append(f"num_layers={arch.num_layers} is not divisible by export.inference_pp={pp}")
    if problems:
        raise ExportError("; ".join(problems) + ".")


def _split_qkv(q: QuantizedLinear, k: QuantizedLinear, v: QuantizedLinear, arch: LlamaArch, r: int, tp: int) -> QuantizedLinear:
    d, nkv = arch.head_dim, arch.num_query_groups
    q_rows = q.out_features // tp
    if nkv >= tp:
        per = nkv // tp
        kv = slice(r * per * d, (r + 1) * per * d)
    else:  # duplicate: tp // nkv consecutive ranks share one KV head
        head = r // (tp // nkv)
        kv = slice(head * d, (head + 1) * d)
    return cat_rows([q.take_rows(slice(r * q_rows, (r + 1) * q_rows)), k.take_rows(kv), v.take_rows(kv)])


def _rows(ql: QuantizedLinear, r: int, tp: int) -> QuantizedLinear:
    n = ql.out_features // tp
    return ql.take_rows(slice(r * n, (r + 1) * n))


def _cols(ql: QuantizedLinear, r: int, tp: int) -> QuantizedLinear:
    n = ql.weight.shape[1] // tp
    return ql.cols(r * n, (r + 1) * n)


def _vocab_shards(t: torch.Tensor, tp: int) -> tuple[torch.Tensor, ...]:
    """Rows zero-padded once to a multiple of tp, then one view per rank."""
    padded = -(-t.shape[0] // tp) * tp
    if padded != t.shape[0]:
        t = torch.cat([t, t.new_zeros(padded - t.shape[0], t.shape[1])])
    return t.chunk(tp)


def layer_shards(layer: HFLayer, arch: LlamaArch, r: int, tp: int) -> dict[str, QuantizedLinear]:
    """TensorRT-LLM modules of one layer on tensor-parallel rank r."""
    lin = layer.linears
    return {
        "attention.qkv": _split_qkv(lin["self_attn.q_proj"], lin["self_attn.k_proj"], lin["self_attn.v_proj"], arch, r, tp),
        "attention.dense": _cols(lin["self_attn.o_proj"], r, tp),
        "mlp.fc": _rows(lin["mlp.gate_proj"], r, tp),
        "mlp.gate": _rows(lin["mlp.up_proj"], r, tp),
        "mlp.proj": _cols(lin["mlp.down_proj"], r, tp),
    }


class TRTLLMWriter:
    def __init__(self, directory: Path, arch: LlamaArch, dtype: torch.dtype, tp: int, pp: int,
                 architecture: str = "LlamaForCausalLM"):
        check_layout(arch, tp, pp)
        check_architecture(architecture)
        self.directory, self.arch, self.dtype, self.tp, self.pp = Path(directory), arch, dtype, tp, pp
        self.architecture = architecture
        self.directory.mkdir(parents=True, exist_ok=True)
        self.files = [SafetensorsFile(self.directory / f"rank{n}.safetensors") for n in range(tp * pp)]
        self.per_stage = arch.num_layers // pp
        self.medusa: tuple[dict, int, int] | None = None

    def add_medusa(self, tensors: dict[str, tuple[torch.Tensor, str]], heads: int, layers: int) -> None:
        """Medusa heads beside the base (TensorRT-LLM's MedusaForCausalLM): on the last stage, H x H
        layers split by rows, vocab heads by vocabulary rows."""
        self.medusa = (tensors, heads, layers)

    def _rank(self, tp_rank: int, pp_rank: int) -> SafetensorsFile:
        return self.files[tp_rank + pp_rank * self.tp]

    def embedding(self, weight: torch.Tensor) -> None:
        for r, shard in enumerate(_vocab_shards(weight.to(self.dtype), self.tp)):
            self._rank(r, 0).add("transformer.vocab_embedding.weight", shard)
        self._embedding = weight  # lm_head of tied models (written with the head)

    def layer(self, layer: HFLayer) -> None:
        stage, local = divmod(layer.index, self.per_stage)
        prefix = f"transformer.layers.{local}."
        input_norm = layer.norms["input_layernorm.weight"].to(self.dtype)
        post_norm = layer.norms["post_attention_layernorm.weight"].to(self.dtype)
        for r in range(self.tp):
            out = self._rank(r, stage)
            out.add(prefix + "input_layernorm.weight", input_norm)
            out.add(prefix + "post_layernorm.weight", post_norm)
            for module, ql in layer_shards(layer, self.arch, r, self.tp).items():
                for suffix, t in trtllm_linear_tensors(ql, self.dtype).items():
                    out.add(f"{prefix}{module}.{suffix}", t)
            if layer.kv_scales is not None:
                # The engine uses one scale for K and V: the loader takes max(k, v) (as written here).
                k, v = layer.kv_scales
                out.add(prefix + "attention.kv_cache_scaling_factor", torch.maximum(k, v).reshape(1))
                out.add(prefix + "attention.k_cache_scaling_factor", k.reshape(1))
                out.add(prefix + "attention.v_cache_scaling_factor", v.reshape(1))

    def head(self, norm: torch.Tensor, output: torch.Tensor | None) -> None:
        lm_head = (output if output is not None else self._embedding).to(self.dtype)
        norm = norm.to(self.dtype)
        for r, shard in enumerate(_vocab_shards(lm_head, self.tp)):
            out = self._rank(r, self.pp - 1)
            out.add("transformer.ln_f.weight", norm)
            out.add("lm_head.weight", shard)
        if self.medusa is not None:
            for name, (t, split) in self.medusa[0].items():
                shards = _vocab_shards(t, self.tp) if split == "vocab" else t.chunk(self.tp, dim=0)
                for r, shard in enumerate(shards):
                    self._rank(r, self.pp - 1).add(name, shard.contiguous())

    def finish(self, summary: QuantSummary, producer: dict) -> list[Path]:
        for f in self.files:
            f.close()
        quant, quant_cfg = summary.trtllm_quantization(self.pp)
        config = trtllm_config(self.arch, self.dtype, self.tp, self.pp, self.architecture, quant, producer)
        if self.medusa is not None:
            # TensorRT-LLM's Medusa converter defaults: max_draft_len = the tree's token budget (63).
            config.update({"architecture": "MedusaForCausalLM", "model_type": "llama", "num_medusa_heads": self.medusa[1],
                           "num_medusa_layers": self.medusa[2], "max_draft_len": 63})
        sparsity = summary.sparsity_config(trtllm=True)
        if sparsity is not None:
            config["sparsity"] = sparsity  # trtllm-build --weight_sparsity turns the zeros into sparse GEMMs
        (self.directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if quant_cfg is not None:
            (self.directory / "quant_cfg.json").write_text(json.dumps(quant_cfg, indent=2) + "\n")
        return [f.path for f in self.files]

    def abort(self) -> None:
        for f in self.files:
            f.abort()


def trtllm_config(arch: LlamaArch, dtype: torch.dtype, tp: int, pp: int, architecture: str, quant: dict, producer: dict) -> dict:
    return {
        "producer": producer, "architecture": architecture, "dtype": DTYPE_NAMES[dtype],
        "logits_dtype": "float32", "num_hidden_layers": arch.num_layers,
        "num_attention_heads": arch.num_attention_heads, "num_key_value_heads": arch.num_query_groups,
        "hidden_size": arch.hidden_size, "intermediate_size": arch.ffn_hidden_size, "head_size": arch.head_dim,
        "norm_epsilon": arch.norm_eps, "vocab_size": arch.vocab_size,
        "max_position_embeddings": arch.max_position_embeddings,
        "hidden_act": "silu",  # Llama's GatedMLP: proj(silu(fc(x)) * gate(x))
        # Set explicitly: TensorRT-LLM defaults to learned_absolute when the key is absent.
        "position_embedding_type": "rope_gpt_neox", "rotary_base": arch.rotary_base, "rotary_pct": 1.0,
        "use_parallel_embedding": True, "embedding_sharding_dim": 0, "share_embedding_table": False,
        "tie_word_embeddings": arch.tie_word_embeddings,
        "mapping": {"world_size": tp * pp, "tp_size": tp, "pp_size": pp},
        "mlp_bias": False, "attn_bias": False, "quantization": quant,
    }
