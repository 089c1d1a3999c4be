"""Draft checkpoints of the speculative heads, named as the engines load them (export.format=draft).

EAGLE-3 -> an `LlamaForCausalLMEagle3` directory (vLLM, SGLang, TensorRT-LLM's PyTorch backend):
  midlayer.{input_layernorm,hidden_norm,post_attention_layernorm}.weight, midlayer.self_attn.
  {q,k,v,o}_proj.weight (q/k/v read 2h inputs: [embedding, feature]), midlayer.mlp.{gate,up,down}_proj
  .weight, fc.weight [h, 3h] (aux layers in ascending order), norm.weight, lm_head.weight
  [draft vocab, h], and with a reduced vocabulary d2t (int64, target = draft + d2t[draft]) and t2d.
  The aux layer ids: engines disagree on what an explicit id means (vLLM 0.32: the state entering
  layer k; SGLang / TensorRT-LLM / ModelOpt: the output of layer k), but all default to the same
  tensors, which are EAGLE-3's and ours ([1, L/2-1, L-4] outputs). So the default is written as no
  id at all (every engine then reads the right states); other choices are written in the
  output-of-layer-k convention, with a warning for vLLM.
Medusa -> vLLM's `MedusaModel` directory: blocks.{i}.layers.{j}.{weight,bias}, lm_heads.{i}.weight,
  medusa_fc_bias true (vLLM drops the biases otherwise). TensorRT-LLM's MedusaForCausalLM checkpoint
  comes from export.format=trtllm (the base's rank files plus medusa_heads.*).
MTP -> DeepSeek-V3's names for one next-token-prediction layer after the base's layers:
  model.layers.{L}.{enorm,hnorm,eh_proj,shared_head.norm,shared_head.head,embed_tokens}, and the
  decoder layer in Llama names; no engine serves MTP for Llama models today (vLLM/SGLang load it
  for DeepSeek / Qwen-style MTP architectures only), so this is a checkpoint to convert, not to serve.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from nemo_quant.models.arch import LlamaArch
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.speculative.config import Method, SpeculativeConfig

EAGLE3_LAYER = {"input_layernorm": "input_layernorm", "hidden_norm": "hidden_norm",
                "post_attention_layernorm": "post_attention_layernorm", "q_proj": "self_attn.q_proj",
                "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj", "o_proj": "self_attn.o_proj",
                "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj", "down_proj": "mlp.down_proj"}


def draft_problem(cfg: SpeculativeConfig | None) -> str | None:
    if cfg is None:
        return ("export.format=draft writes speculative heads and this model has none: train them with `nemo-quant "
                "train speculative=<eagle3|medusa|mtp>` and export that checkpoint (checkpoint.load=<dir>).")
    if Method(cfg.method) == Method.eagle1:
        return ("export.format=draft: EAGLE-1 drafts are trained and measured here but not exported (the engines' "
                "EAGLE-1 loaders differ in bias and norm layout); use speculative=eagle3 for a deployable draft.")
    return None


def _layer_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def eagle3_files(t: dict[str, torch.Tensor], cfg: SpeculativeConfig, arch: LlamaArch, dtype: torch.dtype,
                 aux: list[int]) -> tuple[dict, dict[str, torch.Tensor]]:
    from nemo_quant.speculative.mode import default_aux_layers

    ids = t.get("draft_ids")
    vocab = ids.numel() if ids is not None else arch.vocab_size
    out = {"fc.weight": t["fc.weight"], "norm.weight": t["norm.weight"], "lm_head.weight": t["lm_head.weight"][:vocab]}
    for ours, theirs in EAGLE3_LAYER.items():
        out[f"midlayer.{theirs}.weight"] = t[f"layer.{ours}.weight"]
    out = {k: v.to(dtype) for k, v in out.items()}
    if ids is not None:
        out["d2t"] = (ids - torch.arange(vocab)).to(torch.int64)
        t2d = torch.zeros(arch.vocab_size, dtype=torch.bool)
        t2d[ids] = True
        out["t2d"] = t2d
    from nemo_quant.export.hf import hf_model_config

    config = {**hf_model_config(arch, dtype), "architectures": ["LlamaForCausalLMEagle3"], "num_hidden_layers": 1,
              "draft_vocab_size": vocab, "target_hidden_size": arch.hidden_size, "tie_word_embeddings": False,
              "num_aux_hidden_states": len(aux),
              "eagle_config": {"use_aux_hidden_state": True, "use_input_layernorm_in_first_layer": True,
                               "use_last_layernorm": True}}
    if sorted(aux) != default_aux_layers(arch.num_layers):
        config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] = sorted(aux)
        if is_main_rank():
            print(f"[nemo_quant] warning: speculative.aux_layers={aux} are written as eagle_aux_hidden_state_layer_ids in "
                  "the output-of-layer-k convention (SGLang, TensorRT-LLM, ModelOpt); vLLM 0.32 reads id k as the "
                  f"state entering layer k: for vLLM write {[i + 1 for i in sorted(aux)]}.", flush=True)
    config["nemo_quant"] = {"method": "eagle3", "aux_layer_outputs": sorted(aux), "ttt_steps": cfg.ttt_steps}
    return config, out


def medusa_files(t: dict[str, torch.Tensor], cfg: SpeculativeConfig, arch: LlamaArch,
                 dtype: torch.dtype) -> tuple[dict, dict[str, torch.Tensor]]:
    out = {}
    for i in range(cfg.num_heads):
        for j in range(cfg.head_layers):
            for kind in ("weight", "bias"):
                out[f"blocks.{i}.layers.{j}.{kind}"] = t[f"heads.{i}.blocks.{j}.linear.{kind}"].to(dtype)
        out[f"lm_heads.{i}.weight"] = t[f"heads.{i}.lm_head.weight"][: arch.vocab_size].to(dtype)
    # Only these keys: vLLM renames any key with "num" and "heads" / "layers" in it to num_heads / num_hidden_layers.
    config = {"architectures": ["MedusaModel"], "model_type": "medusa", "hidden_size": arch.hidden_size,
              "vocab_size": arch.vocab_size, "truncated_vocab_size": arch.vocab_size, "num_heads": cfg.num_heads,
              "num_hidden_layers": cfg.head_layers, "medusa_fc_bias": True, "original_lm_head": False,
              "torch_dtype": str(dtype).removeprefix("torch.")}
    return config, out


def medusa_trtllm_tensors(t: dict[str, torch.Tensor], cfg: SpeculativeConfig, arch: LlamaArch,
                          dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, str]]:
    """TensorRT-LLM's Medusa tensors, each with how it splits over inference TP ("rows"/"vocab")."""
    out = {}
    for i in range(cfg.num_heads):
        for j in range(cfg.head_layers):
            for kind in ("weight", "bias"):
                out[f"medusa_heads.{i}.medusa_layers.{j}.linear.{kind}"] = (
                    t[f"heads.{i}.blocks.{j}.linear.{kind}"].to(dtype), "rows")
        out[f"medusa_heads.{i}.lm_head.weight"] = (t[f"heads.{i}.lm_head.weight"][: arch.vocab_size].to(dtype), "vocab")
    return out


def mtp_files(model: nn.Module, t: dict[str, torch.Tensor], arch: LlamaArch, dtype: torch.dtype,
              layer_hf: dict[str, torch.Tensor], embedding: torch.Tensor, head: torch.Tensor) -> tuple[dict, dict]:
    from nemo_quant.export.hf import hf_model_config

    p = f"model.layers.{arch.num_layers}."
    out = {p + "enorm.weight": t["mtp.enorm.weight"], p + "hnorm.weight": t["mtp.hnorm.weight"],
           p + "eh_proj.weight": t["mtp.eh_proj.weight"], p + "shared_head.norm.weight": t["mtp.final_layernorm.weight"],
           p + "shared_head.head.weight": head.clone(), p + "embed_tokens.weight": embedding}
    out.update({p + k: v for k, v in layer_hf.items()})
    config = {**hf_model_config(arch, dtype), "num_nextn_predict_layers": 1,
              "nemo_quant": {"method": "mtp", "note": "DeepSeek-V3 MTP names (enorm/hnorm/eh_proj with the embedding "
                             "first, shared_head); no engine serves MTP for Llama models today"}}
    return config, {k: v.to(dtype) for k, v in out.items()}


def _hf_layer(layer: nn.Module, arch: LlamaArch, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A Megatron transformer layer (gathered) in Llama names (collective over TP)."""
    from nemo_quant.export.gather import _piece
    from nemo_quant.export.hf_layout import convert_layer

    hf = convert_layer(_piece(layer), arch)
    out = {k: v.to(dtype) for k, v in hf.norms.items()}
    for proj, ql in hf.linears.items():
        out[f"{proj}.weight"] = ql.weight.to(dtype)
    return out


def write_draft(model: nn.Module, arch: LlamaArch, export_cfg, spec: SpeculativeConfig) -> list[Path]:
    """Gather the heads (collective) and write the draft directory into `export_cfg.path` (atomic)."""
    from safetensors.torch import save_file

    from nemo_quant.checkpoint.atomic import atomic_directory
    from nemo_quant.export.gather import _gather, gather_module
    from nemo_quant.models.loading import DTYPES
    from nemo_quant.speculative.mode import ATTR, aux_layers

    dtype = DTYPES[getattr(export_cfg.dtype, "value", export_cfg.dtype)]
    draft = getattr(model, ATTR)
    tensors = gather_module(draft)
    method = Method(spec.method)
    if method == Method.mtp:
        from nemo_quant.speculative.base_view import base_head_weight

        layer = _hf_layer(draft.mtp.transformer_layer, arch, dtype)
        embedding = _gather(model.embedding.word_embeddings.weight, 0)[: arch.vocab_size]
        head = _gather(base_head_weight(model), 0)[: arch.vocab_size]
        config, out = mtp_files(model, tensors, arch, dtype, layer, embedding, head)
    elif method == Method.medusa:
        config, out = medusa_files(tensors, spec, arch, dtype)
    else:
        config, out = eagle3_files(tensors, spec, arch, dtype, aux_layers(spec, arch.num_layers))
    path = Path(export_cfg.path).expanduser().resolve()
    with atomic_directory(path, export_cfg.overwrite, key="export.path") as staging:
        if is_main_rank():
            save_file({k: v.contiguous() for k, v in out.items()}, str(staging / "model.safetensors"),
                      metadata={"format": "pt"})
            (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return [path / "model.safetensors", path / "config.json"]
