"""`nemo-quant validate` for speculative drafts (export.format=draft, and TensorRT-LLM's Medusa
tensors), from the safetensors header and config.json alone, against the shapes the config
implies: EAGLE-3 (LlamaForCausalLMEagle3), vLLM Medusa (MedusaModel), DeepSeek-style MTP."""
from __future__ import annotations

import json
from pathlib import Path

from nemo_quant.export.validate import DTYPE_NAMES, Report, _check_file_layout, _compare, _require, read_header

EAGLE3 = "LlamaForCausalLMEagle3"
MEDUSA = "MedusaModel"
FLOAT = {"F32", "BF16", "F16"}


def draft_kind(config: dict) -> str | None:
    archs = config.get("architectures") or []
    if EAGLE3 in archs:
        return "eagle3-draft"
    if MEDUSA in archs:
        return "medusa-draft"
    if "num_nextn_predict_layers" in config:
        return "mtp"
    return None


def _dtype(config: dict) -> set[str]:
    name = config.get("torch_dtype")
    return {DTYPE_NAMES[name]} if name in DTYPE_NAMES else FLOAT


def _llama_layer(config: dict, prefix: str, dtype: set[str], qkv_in: int, extra_norms=()) -> dict:
    h, f = config["hidden_size"], config["intermediate_size"]
    nh = config["num_attention_heads"]
    kv, d = config.get("num_key_value_heads", nh), config.get("head_dim") or h // nh
    e = {f"{prefix}self_attn.q_proj.weight": [nh * d, qkv_in], f"{prefix}self_attn.k_proj.weight": [kv * d, qkv_in],
         f"{prefix}self_attn.v_proj.weight": [kv * d, qkv_in], f"{prefix}self_attn.o_proj.weight": [h, nh * d],
         f"{prefix}mlp.gate_proj.weight": [f, h], f"{prefix}mlp.up_proj.weight": [f, h], f"{prefix}mlp.down_proj.weight": [h, f],
         f"{prefix}input_layernorm.weight": [h], f"{prefix}post_attention_layernorm.weight": [h]}
    e.update({f"{prefix}{n}.weight": [h] for n in extra_norms})
    return {k: (dtype, [shape], True) for k, shape in e.items()}


def validate_draft(directory: Path, config: dict, report: Report) -> None:
    kind = draft_kind(config)
    report.kind = kind
    path = directory / "model.safetensors"
    if not path.is_file():
        report.errors.append(f"{directory}: missing model.safetensors")
        return
    header = read_header(path)
    _check_file_layout(path, header, report)
    report.tensors = len(header)
    dtype = _dtype(config)
    if kind == "eagle3-draft":
        if not _require(config, ["hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
                                 "draft_vocab_size"], "config.json", report):
            return
        h, vd, v = config["hidden_size"], config["draft_vocab_size"], config["vocab_size"]
        ids = (config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        aux = config.get("num_aux_hidden_states") or (len(ids) if ids else 3)  # vLLM's order of precedence
        expected = _llama_layer(config, "midlayer.", dtype, 2 * h, ("hidden_norm",))
        expected.update({"fc.weight": (dtype, [[h, aux * config.get("target_hidden_size", h)]], True),
                         "norm.weight": (dtype, [[h]], True), "lm_head.weight": (dtype, [[vd, h]], True),
                         "d2t": ({"I64"}, [[vd]], vd != v), "t2d": ({"BOOL"}, [[v]], False)})
        if config.get("tie_word_embeddings", True):
            report.errors.append("config.json: an EAGLE-3 draft has its own lm_head; set tie_word_embeddings false")
    elif kind == "medusa-draft":
        if not _require(config, ["hidden_size", "vocab_size", "num_heads", "num_hidden_layers"], "config.json", report):
            return
        h, v = config["hidden_size"], config.get("truncated_vocab_size") or config["vocab_size"]
        bias = config.get("medusa_fc_bias", False)
        expected = {}
        for i in range(config["num_heads"]):
            for j in range(config["num_hidden_layers"]):
                expected[f"blocks.{i}.layers.{j}.weight"] = (dtype, [[h, h]], True)
                expected[f"blocks.{i}.layers.{j}.bias"] = (dtype, [[h]], bias)
            expected[f"lm_heads.{i}.weight"] = (dtype, [[v, h]], True)
        if not bias and any(k.endswith(".bias") for k in header):
            report.errors.append("config.json: medusa_fc_bias is false, so vLLM would drop the heads' biases")
    else:
        if not _require(config, ["hidden_size", "num_hidden_layers", "vocab_size"], "config.json", report):
            return
        h, v, p = config["hidden_size"], config["vocab_size"], f"model.layers.{config['num_hidden_layers']}."
        expected = _llama_layer(config, p, dtype, h)
        expected.update({p + "enorm.weight": (dtype, [[h]], True), p + "hnorm.weight": (dtype, [[h]], True),
                         p + "eh_proj.weight": (dtype, [[h, 2 * h]], True),
                         p + "shared_head.norm.weight": (dtype, [[h]], True),
                         p + "shared_head.head.weight": (dtype, [[v, h]], True),
                         p + "embed_tokens.weight": (dtype, [[v, h]], True)})
    _compare(expected, header, path.name, report)


def trtllm_medusa_expected(config: dict, dtype: str, vocab_rows: int, tp: int) -> dict:
    """TensorRT-LLM's MedusaForCausalLM tensors of one rank (last stage)."""
    h = config["hidden_size"]
    expected = {}
    for i in range(config["num_medusa_heads"]):
        for j in range(config.get("num_medusa_layers", 1)):
            p = f"medusa_heads.{i}.medusa_layers.{j}.linear."
            expected[p + "weight"] = ({dtype}, [[h // tp, h]], True)
            expected[p + "bias"] = ({dtype}, [[h // tp]], True)
        expected[f"medusa_heads.{i}.lm_head.weight"] = ({dtype}, [[vocab_rows, h]], True)
    return expected


def is_draft(directory: Path) -> bool:
    config = directory / "config.json"
    return config.is_file() and draft_kind(json.loads(config.read_text())) is not None
