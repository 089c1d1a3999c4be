"""2:4 sparsity on SmolLM2-135M, side by side with NVIDIA ModelOpt (BENCHMARKS.md, "2:4 sparsity").

One run on an idle machine, everything in sequence:
- ours, one-shot: magnitude, SparseGPT (sequential, reconstruction kept), ADMM (the default):
  perplexity on the Persuasion windows and the wall time of `sparsify`;
- ours, composed: the ADMM model then FP8 and INT8-SmoothQuant;
- ModelOpt 0.47 `sparse_magnitude` and `sparsegpt` on the HF model (benchmarks/
  modelopt_sparsity_side.py in .venv-modelopt), same calibration and evaluation tokens;
- last, ours, the 200-step mask-kept fine-tune of the ADMM model (training protocol: AdamW
  0.9/0.95, lr 1e-5 after 10 warm-up steps, micro-batch 1, the first 200 windows of the novels).

    .venv/bin/python benchmarks/sparsity.py [--modelopt .venv-modelopt/bin/python] [--ft-steps 200]
Writes benchmarks/results/sparsity.{json,md} (rows also appended to sparsity.jsonl as they finish).
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import torch

RESULTS = Path(__file__).parent / "results"
ONE_SHOT = ("magnitude", "sparsegpt", "admm")
COMPOSED = ("fp8", "int8_sq")


def _row(label, ppl, baseline, seconds=None, **extra):
    return {"run": label, "perplexity": ppl, "delta_pct": 100 * (ppl - baseline) / baseline, "seconds": seconds,
            "rss_gib": psutil.Process().memory_info().rss / 2**30, **extra}


def run_ours(calib, evals, log):
    """(baseline, rows, (the ADMM-sparse model, the loaded dense model)) of the one-shot runs."""
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.quantization.mixed_precision import load_preset
    from nemo_quant.sparsity import sparsify

    loaded = load_model(None)
    baseline = perplexity(loaded.model, evals, loaded.vocab_size).perplexity
    rows = [_row("fp32 dense", baseline, baseline)]
    log(rows[-1])
    loop = windows_forward_loop(calib)
    for method in ONE_SHOT:
        model = load_model(None).model
        apply_modes(model, [("sparsity", {"method": method})])
        report = sparsify(model, loop)
        rows.append(_row(f"ours {method}", perplexity(model, evals, loaded.vocab_size).perplexity, baseline,
                         report.seconds))
        log(rows[-1])
        if method != "admm":
            del model
    sparse_state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    for preset in COMPOSED:
        start = time.perf_counter()
        apply_modes(model, [("quantize", load_preset(preset))])
        calibrate(model, loop)
        rows.append(_row(f"ours admm + {preset}", perplexity(model, evals, loaded.vocab_size).perplexity, baseline,
                         time.perf_counter() - start))
        log(rows[-1])
        model = load_model(None).model
        apply_modes(model, [("sparsity", {"method": "admm"})])
        model.load_state_dict(sparse_state, strict=False)
    return baseline, rows, (model, loaded)


def _fine_tune(model, loaded, windows, evals, steps, baseline, rows) -> dict:
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.sparsity.modules import sparse_layers
    from nemo_quant.training.loop import TrainState, make_optimizer, train

    torch.manual_seed(1234)
    optimizer = make_optimizer(model, 1e-5, 0.0, (0.9, 0.95))
    step_times = []
    original_step = optimizer.step

    def timed_step(*args, **kwargs):
        step_times.append(time.perf_counter())
        return original_step(*args, **kwargs)

    optimizer.step = timed_step
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train(model, loaded.source.arch, optimizer, windows[:steps], TrainState(), steps, 1, Path(tmp), save_every=steps,
              warmup_steps=10)
        seconds = time.perf_counter() - start
    zeros_kept = all(bool((m.weight[~m.sparse_mask] == 0).all()) for _, m in sparse_layers(model))
    ppl = perplexity(model, evals, loaded.vocab_size).perplexity
    one_shot = next(r["perplexity"] for r in rows if r["run"] == "ours admm")
    gaps = [b - a for a, b in zip(step_times, step_times[1:])]
    return _row(f"ours admm + {steps}-step fine-tune (LM loss, masks kept)", ppl, baseline, seconds,
                gap_closed=1 - (ppl - baseline) / (one_shot - baseline), zeros_kept=zeros_kept,
                median_step_s=sorted(gaps)[len(gaps) // 2] if gaps else None)


def run_modelopt(python: str, calib, evals, log) -> list[dict]:
    from safetensors.torch import save_file

    from nemo_quant.models.loading import default_model_path

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tokens = Path(tmp) / "tokens.safetensors"
        save_file({"calibration": calib.contiguous(), "evaluation": evals.contiguous()}, str(tokens))
        script = Path(__file__).parent / "modelopt_sparsity_side.py"
        proc = subprocess.Popen([python, str(script), str(tokens), str(default_model_path()), "baseline",
                                 "sparse_magnitude", "sparsegpt"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True)
        for line in proc.stdout:
            if line.startswith("{"):
                rows.append(json.loads(line))
                log(rows[-1])
        if proc.wait() != 0:
            rows.append({"run": "modelopt_sparsity_side.py", "error": f"exited with {proc.returncode}"})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--modelopt", default=None, help="python of .venv-modelopt (make modelopt-venv)")
    parser.add_argument("--ft-steps", type=int, default=200)
    parser.add_argument("--windows", type=int, default=32)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from nemo_quant.data.datasets import calibration_windows, evaluation_windows, training_windows
    from nemo_quant.data.windows import fingerprint
    from nemo_quant.models.loading import load_tokenizer, resolve_model_path
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, teardown

    init_megatron(ParallelLayout(1, 1))
    tokenizer = load_tokenizer(resolve_model_path(None))
    data = OmegaConf.create({"name": "austen", "seq_length": 512, "calib_samples": args.windows,
                             "eval_samples": args.windows})
    calib, evals = calibration_windows(data, tokenizer), evaluation_windows(data, tokenizer)
    train_windows = training_windows(data, OmegaConf.create({"seq_length": 512, "max_train_windows": args.ft_steps}),
                                     tokenizer)
    RESULTS.mkdir(exist_ok=True)
    log_file = open(RESULTS / "sparsity.jsonl", "a")

    def log(row):
        print(json.dumps(row), flush=True)
        log_file.write(json.dumps(row) + "\n")
        log_file.flush()

    baseline, rows, (sparse_model, loaded) = run_ours(calib, evals, log)
    # ModelOpt before the fine-tune: the one-shot timings of both tools come from an idle machine.
    modelopt = run_modelopt(args.modelopt, calib, evals, log) if args.modelopt else []
    if args.ft_steps:
        rows.append(_fine_tune(sparse_model, loaded, train_windows, evals, args.ft_steps, baseline, rows))
        log(rows[-1])
    teardown()
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized, fp32)",
            "calibration": f"{fingerprint(calib)} {tuple(calib.shape)}",
            "evaluation": f"{fingerprint(evals)} {tuple(evals.shape)}",
            "machine": f"{platform.machine()} {psutil.cpu_count()} cpus, torch threads {torch.get_num_threads()}"}
    (RESULTS / "sparsity.json").write_text(json.dumps({"meta": meta, "ours": rows, "modelopt": modelopt}, indent=2))
    lines = ["| tool | run | perplexity | delta vs FP32 | wall time (s) |", "|---|---|---|---|---|"]
    for r in rows:
        secs = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
        lines.append(f"| nemo_quant | {r['run']} | {r['perplexity']:.3f} | {r['delta_pct']:+.2f}% | {secs} |")
    for r in modelopt:
        if "perplexity" in r:
            delta = 100 * (r["perplexity"] - baseline) / baseline
            secs = f"{r['sparsify_s']:.1f}" if r.get("sparsify_s") is not None else ""
            lines.append(f"| ModelOpt 0.47 | {r['run']} | {r['perplexity']:.3f} | {delta:+.2f}% | {secs} |")
        else:
            lines.append(f"| ModelOpt 0.47 | {r['run']} | error: {r.get('error', '')[:80]} | | |")
    ft = next((r for r in rows if "fine-tune" in r["run"]), None)
    notes = [f"- {k}: {v}" for k, v in meta.items()]
    if ft:
        notes.append(f"- fine-tune: gap closed {ft['gap_closed']:.1%}, median step {ft['median_step_s']:.2f} s, "
                     f"pruned weights still zero: {ft['zeros_kept']}")
    table = "\n".join(notes + ["", *lines])
    (RESULTS / "sparsity.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
