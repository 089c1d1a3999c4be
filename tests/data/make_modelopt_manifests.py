"""Regenerate `modelopt_manifests.json`: the configs and tensor headers (names, dtypes, shapes;
no data) of checkpoints that NVIDIA ModelOpt 0.47 writes for a tiny random Llama, used to
check that `nemo-quant validate` accepts another tool's output and that our writers produce
the same names, dtypes and shapes.

Run with the ModelOpt virtualenv (`make modelopt-venv`):
    .venv-modelopt/bin/python tests/data/make_modelopt_manifests.py
"""
from __future__ import annotations

import copy
import json
import struct
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).parent
ARCH = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, tie_word_embeddings=False,
            architectures=["LlamaForCausalLM"])


def headers(directory: Path) -> dict:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        raw = f.read_bytes()
        n = struct.unpack("<Q", raw[:8])[0]
        header = json.loads(raw[8:8 + n])
        header.pop("__metadata__", None)
        out[f.name] = {k: [v["dtype"], v["shape"]] for k, v in header.items()}
    return out


def configs(directory: Path) -> dict:
    return {f.name: json.loads(f.read_text()) for f in sorted(directory.glob("*.json")) if "index" not in f.name}


def main() -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    recipes = {
        "fp8": [mtq.FP8_DEFAULT_CFG, mtq.FP8_KV_CFG],
        "int8_sq": [mtq.INT8_SMOOTHQUANT_CFG],
        "w4a16_awq": [mtq.INT4_AWQ_CFG],
        "w4a8_awq": [mtq.W4A8_AWQ_BETA_CFG],
        "nvfp4": [mtq.NVFP4_DEFAULT_CFG, mtq.FP8_KV_CFG],
    }
    manifest = {}
    torch.manual_seed(0)
    for name, parts in recipes.items():
        cfg = copy.deepcopy(parts[0])
        for extra in parts[1:]:
            cfg["quant_cfg"] = list(cfg["quant_cfg"]) + copy.deepcopy(list(extra["quant_cfg"]))
        model = LlamaForCausalLM(LlamaConfig(**ARCH)).to(torch.bfloat16)
        batch = torch.randint(0, ARCH["vocab_size"], (2, 32))
        mtq.quantize(model, cfg, lambda m: m(batch))
        entry = {}
        with tempfile.TemporaryDirectory() as tmp:
            hf_dir = Path(tmp) / "hf"
            export_hf_checkpoint(copy.deepcopy(model), export_dir=hf_dir)
            entry["hf"] = {"configs": configs(hf_dir), "tensors": headers(hf_dir)}
            for tp in (1, 2):
                trt_dir = Path(tmp) / f"trt{tp}"
                try:
                    export_tensorrt_llm_checkpoint(copy.deepcopy(model), "llama", torch.bfloat16, export_dir=trt_dir,
                                                   inference_tensor_parallel=tp)
                    entry[f"trtllm_tp{tp}"] = {"configs": configs(trt_dir), "tensors": headers(trt_dir)}
                except Exception as e:  # noqa: BLE001 - record ModelOpt's own failures
                    entry[f"trtllm_tp{tp}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
        manifest[name] = entry
        print(name, {k: ("error" if "error" in v else len(v["tensors"])) for k, v in entry.items()}, flush=True)
    (HERE / "modelopt_manifests.json").write_text(json.dumps(manifest, indent=1) + "\n")


if __name__ == "__main__":
    main()
