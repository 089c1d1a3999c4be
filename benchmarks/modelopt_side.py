"""The ModelOpt half of the side-by-side PTQ benchmark; runs inside .venv-modelopt only.

    .venv-modelopt/bin/python benchmarks/modelopt_side.py TOKENS.safetensors GGUF RUN=CFG [RUN=CFG ...]

Loads the same SmolLM2 GGUF as a Hugging Face LlamaForCausalLM (transformers' own GGUF
loader, dequantized to fp32), calibrates with NVIDIA ModelOpt on the calibration windows
our side wrote, and scores the same evaluation windows the same way (fp32 logits, NLL of
all 511 predictions per window summed in float64). Prints one JSON object per line. CFG is
a ModelOpt config name, optionally "@64" for weight groups of 64; INT4_GPTQ is ModelOpt's
INT4 weight-only config with its GPTQ algorithm. A failing run is reported, not hidden.
"""
from __future__ import annotations

import copy
import json
import math
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file


def load_model(gguf: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def perplexity(model, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    for window in windows:
        logits = model(window[None]).logits[0, :-1].float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, window[1:, None])
        nll += float(-logp.double().sum())
        count += window.numel() - 1
    return math.exp(nll / count)


def modelopt_config(name: str):
    import modelopt.torch.quantization as mtq

    base, _, group = name.partition("@")
    if base == "INT4_GPTQ":
        cfg = copy.deepcopy(mtq.INT4_AWQ_CFG)
        cfg["algorithm"] = {"method": "gptq"}
    else:
        cfg = copy.deepcopy(getattr(mtq, base))
    if group:
        for entry in cfg["quant_cfg"]:
            if entry.get("quantizer_name") == "*weight_quantizer":
                specs = entry["cfg"] if isinstance(entry["cfg"], list) else [entry["cfg"]]
                for spec in specs:
                    if spec.get("block_sizes"):
                        spec["block_sizes"] = {**spec["block_sizes"], -1: int(group)}
                        spec["block_sizes"].pop("-1", None)
    return cfg


def run(label: str, cfg_name: str, gguf: Path, calib: torch.Tensor, evals: torch.Tensor) -> dict:
    import modelopt.torch.quantization as mtq

    model = load_model(gguf)

    def forward_loop(m):
        for window in calib:
            m(window[None])

    start = time.perf_counter()
    try:
        if cfg_name.startswith("AUTO@"):
            bits = float(cfg_name.split("@")[1])
            batches = [{"input_ids": w[None], "labels": w[None]} for w in calib]
            model, _ = mtq.auto_quantize(
                model, constraints={"effective_bits": bits},
                quantization_formats=[mtq.NVFP4_DEFAULT_CFG, mtq.FP8_DEFAULT_CFG],
                data_loader=batches, forward_step=lambda m, b: m(**b),
                loss_func=lambda out, b: out.loss, num_calib_steps=len(batches), num_score_steps=8)
        else:
            model = mtq.quantize(model, modelopt_config(cfg_name), forward_loop)
        calib_s = time.perf_counter() - start
        return {"run": label, "config": cfg_name, "perplexity": perplexity(model, evals), "calib_s": calib_s}
    except Exception as exc:  # reported in the table: ModelOpt's CPU limits are a finding
        return {"run": label, "config": cfg_name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                "calib_s": time.perf_counter() - start, "trace": traceback.format_exc()[-1500:]}


def main() -> None:
    tokens, gguf = load_file(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(2)
    calib, evals = tokens["calibration"], tokens["evaluation"]
    base = load_model(gguf)
    print(json.dumps({"run": "baseline", "perplexity": perplexity(base, evals)}), flush=True)
    del base
    for spec in sys.argv[3:]:
        label, _, cfg_name = spec.partition("=")
        print(json.dumps(run(label, cfg_name, gguf, calib, evals)), flush=True)


if __name__ == "__main__":
    main()
