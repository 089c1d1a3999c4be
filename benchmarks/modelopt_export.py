"""ModelOpt's export of the same SmolLM2-135M, for the side-by-side export figures.

Runs in ModelOpt's own virtualenv (`make modelopt-venv`), never with nemo_quant installed:
    .venv-modelopt/bin/python benchmarks/modelopt_export.py [--formats FP8_DEFAULT_CFG ...]

Per recipe, in this process: HF LlamaForCausalLM from the GGUF, cast to bf16 (our exports
write bf16), `mtq.quantize` on 2 windows of 256 random tokens (export speed does not depend on
the scales), then `export_hf_checkpoint` and `export_tensorrt_llm_checkpoint` (default arguments, then
inference_tensor_parallel=1), each timed, with the RSS growth while it runs. ModelOpt's failures are recorded as they are.
Writes benchmarks/results/export_modelopt.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from export_throughput import PeakRss  # noqa: E402 (no nemo_quant import: safe in ModelOpt's venv)
from modelopt_side import load_model, modelopt_config  # noqa: E402

RECIPES = {"fp8": "FP8_DEFAULT_CFG", "int8_sq": "INT8_SMOOTHQUANT_CFG", "int4_awq_g64": "INT4_AWQ_CFG@64",
           "w4a8_awq_g64": "W4A8_AWQ_BETA_CFG@64", "nvfp4": "NVFP4_DEFAULT_CFG"}
RESULTS = Path(__file__).parent / "results" / "export_modelopt.json"


def _size_mb(directory: Path) -> float:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 1e6


def _timed(fn, directory: Path) -> dict:
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    try:
        with PeakRss() as peak:
            fn()
    except Exception as e:  # noqa: BLE001 - ModelOpt's own failure is the result
        return {"error": f"{type(e).__name__}: {e}"[:300], "trace": traceback.format_exc()[-600:]}
    seconds = time.perf_counter() - start
    mb = _size_mb(directory)
    return {"mb": round(mb, 1), "s": round(seconds, 2), "mb_per_s": round(mb / seconds, 1),
            "peak_over_before_mb": round((peak.peak - rss_before) / 1e6)}


def main() -> None:
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint, export_tensorrt_llm_checkpoint

    parser = argparse.ArgumentParser()
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--formats", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    calib = torch.randint(0, 49152, (2, 256), generator=torch.Generator().manual_seed(0))
    rows = []
    for label in args.formats:
        row = {"format": label, "recipe": RECIPES[label]}
        try:
            model = load_model(Path(args.gguf)).to(torch.bfloat16)
            # A GGUF-loaded config has no `architectures`; ModelOpt's HF export iterates it.
            model.config.architectures = model.config.architectures or ["LlamaForCausalLM"]
            mtq.quantize(model, modelopt_config(RECIPES[label]), lambda m: [m(w[None]) for w in calib])
        except Exception as e:  # noqa: BLE001
            row["error"] = f"quantize: {type(e).__name__}: {e}"[:300]
            rows.append(row)
            print(json.dumps(row), flush=True)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            hf, trt, trt0 = Path(tmp) / "hf", Path(tmp) / "trt", Path(tmp) / "trt0"
            row["hf"] = _timed(lambda: export_hf_checkpoint(model, export_dir=hf), hf)
            # Default arguments (inference_tensor_parallel=0) first, as a user would call it.
            row["trtllm_default_args"] = _timed(
                lambda: export_tensorrt_llm_checkpoint(model, "llama", torch.bfloat16, export_dir=trt0), trt0)
            row["trtllm"] = _timed(lambda: export_tensorrt_llm_checkpoint(
                model, "llama", torch.bfloat16, export_dir=trt, inference_tensor_parallel=1), trt)
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.write_text(json.dumps({"modelopt": modelopt.__version__, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
