"""PTQ accuracy benchmark (BENCHMARKS.md protocol), optionally side by side with NVIDIA ModelOpt.

    .venv/bin/python benchmarks/ptq_accuracy.py [--runs fp8 int4_awq_g128 ...] [--kv-cache fp8]
                                                [--modelopt .venv-modelopt/bin/python]

Per run: perplexity on the 32 Persuasion windows, delta vs the FP32 baseline, calibration
wall time (algorithm + calibration on 32 x 512 tokens; for auto mixed precision also the
sensitivity pass), process RSS. With --modelopt, the same token tensors go to
benchmarks/modelopt_side.py in ModelOpt's own virtualenv (`make modelopt-venv`), which runs
its counterpart configs on an HF LlamaForCausalLM holding the same weights, after ours.
Writes benchmarks/results/ptq_accuracy[_kv_X].{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import torch

# label -> (preset, Hydra overrides of quant.*, ModelOpt counterpart or None)
RUNS = {
    "fp8": ("fp8", [], "FP8_DEFAULT_CFG"),
    "fp8_gptq": ("fp8_gptq", [], "FP8_DEFAULT_CFG"),
    "fp8_sq": ("fp8", ["quant.algorithm=smoothquant"], None),
    "int8_sq": ("int8_sq", [], "INT8_SMOOTHQUANT_CFG"),
    "int4_awq_g128": ("int4_awq", [], "INT4_AWQ_CFG"),
    "int4_awq_g64": ("int4_awq", ["quant.weight.block_size=64"], "INT4_AWQ_CFG@64"),
    "int4_awq_gptq_g128": ("int4_awq", ["quant.gptq.enabled=true"], "INT4_AWQ_CFG"),
    "int4_awq_gptq_g64": ("int4_awq", ["quant.weight.block_size=64", "quant.gptq.enabled=true"], "INT4_AWQ_CFG@64"),
    "w4a8_awq_g128": ("w4a8_awq", [], "W4A8_AWQ_BETA_CFG"),
    "w4a8_awq_g64": ("w4a8_awq", ["quant.weight.block_size=64"], "W4A8_AWQ_BETA_CFG@64"),
    "int4_gptq_g64": ("int4_gptq", ["quant.weight.block_size=64"], "INT4_GPTQ@64"),
    "nvfp4": ("nvfp4", [], "NVFP4_DEFAULT_CFG"),
    "nvfp4_awq": ("nvfp4_awq", [], "NVFP4_AWQ_LITE_CFG"),
    "auto_6bits": ("auto", [], "AUTO@6"),
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


def _algorithm(cfg) -> str:
    if cfg.auto is not None:
        return f"auto ({'/'.join(cfg.auto.formats)}/bf16 at {cfg.auto.effective_bits:g} bits)"
    return cfg.algorithm.value + (" + gptq" if cfg.gptq.enabled else "")


def run_ours(names: list[str], calib, evals, loaded, kv_cache: str | None) -> list[dict]:
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.quantization.mixed_precision import auto_plan

    baseline = perplexity(loaded.model, evals, loaded.vocab_size).perplexity
    rows = [{"format": "fp32 baseline", "perplexity": baseline, "delta_pct": 0.0, "calib_s": 0.0,
             "rss_gib": psutil.Process().memory_info().rss / 2**30}]
    print(f"baseline {baseline:.4f}", flush=True)
    for name in names:
        preset, overrides, _ = RUNS[name]
        cfg = preset_config(preset, overrides, kv_cache)
        model = load_model(None).model
        start = time.perf_counter()
        row = {"format": name + (f" + kv {kv_cache}" if kv_cache else ""), "algorithm": _algorithm(cfg)}
        if cfg.auto is not None:
            cfg, summary = auto_plan(model, calib, cfg)
            row["plan"] = summary
        apply_modes(model, [("quantize", cfg)])
        calibrate(model, windows_forward_loop(calib))
        row["calib_s"] = time.perf_counter() - start
        ppl = perplexity(model, evals, loaded.vocab_size).perplexity
        row.update(perplexity=ppl, delta_pct=100 * (ppl - baseline) / baseline, rss_gib=psutil.Process().memory_info().rss / 2**30)
        rows.append(row)
        print(f"{name}: {ppl:.4f} ({row['delta_pct']:+.2f}%) calib {row['calib_s']:.1f}s", flush=True)
        del model
    return rows


def run_modelopt(python: str, names: list[str], calib, evals, gguf: Path) -> dict[str, dict]:
    """ModelOpt's counterparts of `names`, keyed by config name (baseline under "baseline").

    Each ModelOpt config runs once even when several of our runs compare against it; its
    lines are appended to results/modelopt_side.jsonl as they arrive (long runs keep what
    finished)."""
    from safetensors.torch import save_file

    configs = list(dict.fromkeys(RUNS[n][2] for n in names if RUNS[n][2]))
    RESULTS.mkdir(exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp, open(RESULTS / "modelopt_side.jsonl", "a") as log:
        tokens = Path(tmp) / "tokens.safetensors"
        save_file({"calibration": calib.contiguous(), "evaluation": evals.contiguous()}, str(tokens))
        script = Path(__file__).parent / "modelopt_side.py"
        proc = subprocess.Popen([python, str(script), str(tokens), str(gguf), *(f"{c}={c}" for c in configs)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        for line in proc.stdout:
            if line.startswith("{"):
                entry = json.loads(line)
                results[entry["run"]] = entry
                log.write(line)
                log.flush()
                print(f"modelopt {entry['run']}: {entry.get('perplexity', entry.get('error'))}", flush=True)
        if proc.wait() != 0:
            results["_failure"] = {"error": f"modelopt_side.py exited with {proc.returncode}"}
    return results


def side_by_side(rows: list[dict], modelopt: dict[str, dict]) -> list[str]:
    base = modelopt.get("baseline", {}).get("perplexity")
    lines = ["| format | ours: algorithm | ours ppl delta | ModelOpt config | ModelOpt ppl delta | ours calib s | ModelOpt calib s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows[1:]:
        label = r["format"]
        counterpart = RUNS.get(label.split(" + kv")[0], (None, None, None))[2]
        mo = modelopt.get(counterpart)
        if mo is None:
            continue
        if "error" in mo:
            theirs, their_s = f"fails: {mo['error'][:90]}", f"{mo['calib_s']:.1f} (failed)"
        else:
            theirs, their_s = f"{100 * (mo['perplexity'] - base) / base:+.2f}% ({mo['perplexity']:.3f})", f"{mo['calib_s']:.1f}"
        lines.append(f"| {label} | {r['algorithm']} | {r['delta_pct']:+.2f}% ({r['perplexity']:.3f}) | {counterpart} | {theirs} "
                     f"| {r['calib_s']:.1f} | {their_s} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--kv-cache", default=None)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--modelopt", default=None, help="python of a virtualenv with nvidia-modelopt (make modelopt-venv)")
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.data.windows import fingerprint
    from nemo_quant.models.loading import default_model_path, load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, teardown

    torch.set_num_threads(max(1, psutil.cpu_count(logical=False) or 1))
    init_megatron(ParallelLayout(1, 1))
    data = OmegaConf.create({"name": "austen", "seq_length": 512, "calib_samples": args.windows, "eval_samples": args.windows})
    loaded = load_model(None)
    calib, evals = calibration_windows(data, loaded.tokenizer), evaluation_windows(data, loaded.tokenizer)
    rows = run_ours(args.runs, calib, evals, loaded, args.kv_cache)
    teardown()
    modelopt = run_modelopt(args.modelopt, args.runs, calib, evals, default_model_path()) if args.modelopt else {}

    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32)", "calibration": f"{fingerprint(calib)} {tuple(calib.shape)}",
            "evaluation": f"{fingerprint(evals)} {tuple(evals.shape)}", "machine": f"{platform.machine()} {psutil.cpu_count()} cpus",
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    RESULTS.mkdir(exist_ok=True)
    suffix = f"_kv_{args.kv_cache}" if args.kv_cache else ""
    (RESULTS / f"ptq_accuracy{suffix}.json").write_text(json.dumps({"meta": meta, "rows": rows, "modelopt": modelopt}, indent=2))
    lines = ["| format | algorithm | perplexity | delta vs FP32 | calib time (s) | RSS (GiB) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['format']} | {r.get('algorithm', '')} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | {r['calib_s']:.1f} | {r['rss_gib']:.2f} |" for r in rows]
    if modelopt:
        lines += ["", "Side by side with NVIDIA ModelOpt 0.47 (same weights, tokens and scoring; run after ours on the same machine):", ""]
        lines += side_by_side(rows, modelopt)
    table = "\n".join(lines)
    (RESULTS / f"ptq_accuracy{suffix}.md").write_text("\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
