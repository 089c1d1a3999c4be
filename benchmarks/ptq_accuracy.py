"""PTQ accuracy benchmark (BENCHMARKS.md protocol): every preset on SmolLM2-135M / Austen.

    .venv/bin/python benchmarks/ptq_accuracy.py [--presets fp8 int4_awq ...] [--kv-cache fp8]

Per preset: perplexity on the 32 Persuasion windows, delta vs the FP32 baseline, calibration
wall time (quantize + calibrate on 32 x 512 tokens), process RSS after calibration.
Writes benchmarks/results/ptq_accuracy.json and .md.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import psutil
import torch

# label -> (preset, Hydra overrides of quant.*, ModelOpt config for the side-by-side run or None)
RUNS = {
    "fp8": ("fp8", [], "FP8_DEFAULT_CFG"),
    "int8_sq": ("int8_sq", [], "INT8_SMOOTHQUANT_CFG"),
    "int4_awq_g128": ("int4_awq", [], "INT4_AWQ_CFG"),
    "int4_awq_g64": ("int4_awq", ["quant.weight.block_size=64"], "INT4_AWQ_CFG@64"),
    "int4_awq_gptq_g128": ("int4_awq", ["quant.gptq.enabled=true"], None),
    "int4_awq_gptq_g64": ("int4_awq", ["quant.weight.block_size=64", "quant.gptq.enabled=true"], None),
    "w4a8_awq_g128": ("w4a8_awq", [], "W4A8_AWQ_BETA_CFG"),
    "w4a8_awq_g64": ("w4a8_awq", ["quant.weight.block_size=64"], "W4A8_AWQ_BETA_CFG@64"),
    "int4_gptq_g64": ("int4_gptq", ["quant.weight.block_size=64"], "INT4_GPTQ@64"),
    "nvfp4": ("nvfp4", [], "NVFP4_DEFAULT_CFG"),
    "nvfp4_awq": ("nvfp4_awq", [], "NVFP4_AWQ_LITE_CFG"),
    "mxfp8": ("mxfp8", [], None),
    "int8_weight_only": ("int8_weight_only", [], None),
    "int4_rtn_g128": ("int4_weight_only", [], None),
}
RESULTS = Path(__file__).parent / "results"


def preset_config(name: str, overrides: list[str], kv_cache: str | None):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from nemo_quant.config.schema import register_configs

    register_configs()
    overrides = [f"quant={name}", *overrides] + ([f"+quant/kv_cache={kv_cache}"] if kv_cache else [])
    with initialize_config_module(config_module="nemo_quant.conf", version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides).quant)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--kv-cache", default=None)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.data.windows import fingerprint
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, teardown

    torch.set_num_threads(max(1, psutil.cpu_count(logical=False) or 1))
    init_megatron(ParallelLayout(1, 1))
    data = OmegaConf.create({"name": "austen", "seq_length": 512, "calib_samples": args.windows, "eval_samples": args.windows})
    loaded = load_model(None)
    calib, evals = calibration_windows(data, loaded.tokenizer), evaluation_windows(data, loaded.tokenizer)
    baseline = perplexity(loaded.model, evals, loaded.vocab_size).perplexity
    rows = [{"format": "fp32 baseline", "perplexity": baseline, "delta_pct": 0.0, "calib_s": 0.0, "rss_gib": psutil.Process().memory_info().rss / 2**30}]
    print(f"baseline {baseline:.4f}", flush=True)
    for name in args.runs:
        preset, overrides, _ = RUNS[name]
        cfg = preset_config(preset, overrides, args.kv_cache)
        model = load_model(None).model
        start = time.perf_counter()
        apply_modes(model, [("quantize", cfg)])
        calibrate(model, windows_forward_loop(calib))
        calib_s = time.perf_counter() - start
        ppl = perplexity(model, evals, loaded.vocab_size).perplexity
        rows.append({"format": name + (f" + kv {args.kv_cache}" if args.kv_cache else ""), "algorithm": _algorithm(cfg), "perplexity": ppl,
                     "delta_pct": 100 * (ppl - baseline) / baseline, "calib_s": calib_s,
                     "rss_gib": psutil.Process().memory_info().rss / 2**30})
        print(f"{name}: {ppl:.4f} ({rows[-1]['delta_pct']:+.2f}%) calib {calib_s:.1f}s", flush=True)
        del model
    teardown()

    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32)", "calibration": f"{fingerprint(calib)} {tuple(calib.shape)}",
            "evaluation": f"{fingerprint(evals)} {tuple(evals.shape)}", "machine": f"{platform.machine()} {psutil.cpu_count()} cpus",
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_kv_{args.kv_cache}" if args.kv_cache else ""
    (RESULTS / f"ptq_accuracy{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| format | algorithm | perplexity | delta vs FP32 | calib time (s) | RSS (GiB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r.get('algorithm', '')} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | {r['calib_s']:.1f} | {r['rss_gib']:.2f} |" for r in rows]
    table = "\n".join(lines)
    (RESULTS / f"ptq_accuracy{suffix}.md").write_text("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table + "\n")
    print(table)


def _algorithm(cfg) -> str:
    algo = cfg.algorithm.value
    return algo + (" + gptq" if cfg.gptq.enabled else "")


if __name__ == "__main__":
    main()
