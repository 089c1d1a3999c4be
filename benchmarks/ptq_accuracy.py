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

PRESETS = ["fp8", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq", "mxfp8", "int8_weight_only", "int4_weight_only"]
RESULTS = Path(__file__).parent / "results"


def preset_config(name: str, kv_cache: str | None):
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    from nemo_quant.config.schema import register_configs

    register_configs()
    overrides = [f"quant={name}"] + ([f"+quant/kv_cache={kv_cache}"] if kv_cache else [])
    with initialize_config_module(config_module="nemo_quant.conf", version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=overrides).quant)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--presets", nargs="*", default=PRESETS)
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
    for name in args.presets:
        cfg = preset_config(name, args.kv_cache)
        model = load_model(None).model
        start = time.perf_counter()
        apply_modes(model, [("quantize", cfg)])
        calibrate(model, windows_forward_loop(calib))
        calib_s = time.perf_counter() - start
        ppl = perplexity(model, evals, loaded.vocab_size).perplexity
        rows.append({"format": name + (f" + kv {args.kv_cache}" if args.kv_cache else ""), "perplexity": ppl,
                     "delta_pct": 100 * (ppl - baseline) / baseline, "calib_s": calib_s,
                     "rss_gib": psutil.Process().memory_info().rss / 2**30})
        print(f"{name}: {ppl:.4f} ({rows[-1]['delta_pct']:+.2f}%) calib {calib_s:.1f}s", flush=True)
        del model
    teardown()

    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32)", "calibration": f"{fingerprint(calib)} {tuple(calib.shape)}",
            "evaluation": f"{fingerprint(evals)} {tuple(evals.shape)}", "machine": f"{platform.machine()} {psutil.cpu_count()} cpus",
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "algorithm": "max calibration (round to nearest)"}
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_kv_{args.kv_cache}" if args.kv_cache else ""
    (RESULTS / f"ptq_accuracy{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = ["| format | perplexity | delta vs FP32 | calib time (s) | RSS (GiB) |", "|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | {r['calib_s']:.1f} | {r['rss_gib']:.2f} |" for r in rows]
    table = "\n".join(lines)
    (RESULTS / f"ptq_accuracy{suffix}.md").write_text("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
