"""QLoRA on SmolLM2-135M, side by side with bitsandbytes + PEFT (BENCHMARKS.md, "QLoRA").

One run on an idle machine, each configuration in its own process (so peak RSS is its own):
- ours: QLoRA (NF4 base, standard init), QLoRA with LoftQ init, bf16 LoRA (the same mode with
  qlora.base_format=none), on the Megatron model in bf16;
- bitsandbytes 0.50.2 + PEFT QLoRA on Hugging Face's LlamaForCausalLM of the same weights (our
  unquantized HF export), NF4 + double quantization, bf16 compute, fp32 adapters.
Training protocol: the first 200 windows of 513 tokens of the five calibration novels, micro-batch
1, AdamW (0.9, 0.95), lr 2e-4 after 10 warm-up steps, r 16, alpha 32, every decoder linear, no
dropout, seed 1234. Evaluation: the 32 Persuasion windows of 512 tokens, before and after.

    .venv/bin/python benchmarks/qlora.py [--steps 200]
Writes benchmarks/results/qlora.{json,md}; rows are also appended to qlora.jsonl as they finish.
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from nemo_quant.utils.memory import release_freed_memory

RESULTS = Path(__file__).parent / "results"
RUNS = {
    "ours_qlora": ("nemo_quant QLoRA (NF4, standard init)", {"base_format": "nf4"}),
    "ours_qlora_loftq": ("nemo_quant QLoRA (NF4, LoftQ init)", {"base_format": "nf4", "init": "loftq"}),
    "ours_lora": ("nemo_quant bf16 LoRA", {"base_format": "none"}),
    "bnb_peft": ("bitsandbytes 0.50.2 + PEFT QLoRA (HF model)", None),
}
LR, WARMUP, RANK, ALPHA = 2e-4, 10, 16, 32


def _data(steps: int, windows: int):
    from omegaconf import OmegaConf

    from nemo_quant.data.datasets import evaluation_windows, training_windows
    from nemo_quant.models.loading import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path(None))
    data = OmegaConf.create({"name": "austen", "seq_length": 512, "calib_samples": windows, "eval_samples": windows})
    train = training_windows(data, OmegaConf.create({"seq_length": 512, "max_train_windows": steps}), tokenizer)
    return train[:steps], evaluation_windows(data, tokenizer)


class StepClock:
    """Median step time and peak RSS while training (the optimizer step marks each step)."""

    def __init__(self):
        self.stamps, self.peak_rss = [], 0

    def tick(self):
        self.stamps.append(time.perf_counter())
        self.peak_rss = max(self.peak_rss, psutil.Process().memory_info().rss)

    def median(self) -> float | None:
        gaps = sorted(b - a for a, b in zip(self.stamps, self.stamps[1:]))
        return gaps[len(gaps) // 2] if gaps else None


def _timed(optimizer, clock: StepClock):
    real = optimizer.step

    def step(*args, **kwargs):
        clock.tick()
        return real(*args, **kwargs)

    optimizer.step = step


def child_ours(key: str, steps: int, windows: int) -> dict:
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.qlora.modules import lora_layers
    from nemo_quant.qlora.nf4_base import stored_bits
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.training.loop import TrainState, make_optimizer, train

    init_megatron(ParallelLayout(1, 1), seed=1234)
    train_windows, evals = _data(steps, windows)
    loaded = load_model(None, "bfloat16")
    model = loaded.model
    start = time.perf_counter()
    apply_modes(model, [("qlora", {"rank": RANK, "alpha": ALPHA, **RUNS[key][1]})])
    apply_s = time.perf_counter() - start
    bits = weights = 0
    for _, m in lora_layers(model):
        if hasattr(m, "nf4_weight"):
            b, w = stored_bits(m)
            bits, weights = bits + b, weights + w
    before = perplexity(model, evals, loaded.vocab_size).perplexity
    release_freed_memory()  # every run starts training with the loading transients given back
    torch.manual_seed(1234)
    optimizer = make_optimizer(model, LR, 0.0, (0.9, 0.95))
    clock = StepClock()
    _timed(optimizer, clock)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        state = train(model, loaded.source.arch, optimizer, train_windows, TrainState(), steps, 1, Path(tmp),
                      save_every=10**9, warmup_steps=WARMUP)
        train_s = time.perf_counter() - t0
    after = perplexity(model, evals, loaded.vocab_size).perplexity
    return {"apply_s": apply_s, "bits_per_param": bits / weights if weights else 16.0, "ppl_before": before,
            "ppl_after": after, "train_s": train_s, "median_step_s": clock.median(),
            "peak_rss_train_gib": clock.peak_rss / 2**30, "first_loss": state.losses[0], "last_loss": state.losses[-1]}


def child_bnb(hf_dir: str, steps: int, windows: int) -> dict:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from nemo_quant.eval.perplexity import window_nll

    torch.manual_seed(1234)
    train_windows, evals = _data(steps, windows)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16, device_map="cpu", quantization_config=
                                                 BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                                    bnb_4bit_use_double_quant=True,
                                                                    bnb_4bit_compute_dtype=torch.bfloat16))
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    apply_s = time.perf_counter() - start
    linear = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in linear:
        # bnb's CPU inference path (AVX512-BF16 CPUs, no grad) repacks the weight for its own kernel
        # on the first eval forward; training on the repacked weight afterwards diverges (measured:
        # loss 3.26 -> 7.54, perplexity 1792). Evaluation and training both take the dequantize path.
        m.support_avx512bf16_for_cpu = False
    weights = sum(m.weight.numel() * 2 for m in linear)
    bits = sum(8 * (m.weight.numel() + m.weight.quant_state.absmax.numel()) + 32 * (
        m.weight.quant_state.state2.absmax.numel() + 1) for m in linear)

    def ppl() -> float:
        model.eval()
        nll = 0.0
        with torch.no_grad():
            for w in evals:
                nll += float(window_nll(model(w[None]).logits, w[None]))
        return float(torch.exp(torch.tensor(nll / (evals.shape[0] * (evals.shape[1] - 1)))))

    before = ppl()
    release_freed_memory()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.95), weight_decay=0.0)
    clock = StepClock()
    losses = []
    model.train()
    t0 = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = LR * min(1.0, (step + 1) / WARMUP)
        w = train_windows[step][None]
        logits = model(w[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.tick()
        optimizer.step()
        losses.append(float(loss))
    train_s = time.perf_counter() - t0
    after = ppl()
    return {"apply_s": apply_s, "bits_per_param": bits / weights, "ppl_before": before, "ppl_after": after,
            "train_s": train_s, "median_step_s": clock.median(), "peak_rss_train_gib": clock.peak_rss / 2**30,
            "first_loss": losses[0], "last_loss": losses[-1]}


def _fp32_baseline() -> float | str:
    """The FP32 model's perplexity on the same Persuasion windows, as ptq_accuracy.py measured it."""
    path = RESULTS / "ptq_accuracy.json"
    if not path.is_file():
        return "not measured (run benchmarks/ptq_accuracy.py)"
    rows = json.loads(path.read_text())["rows"]
    return next((r["perplexity"] for r in rows if r.get("format") == "fp32 baseline"), "not in ptq_accuracy.json")


def _export_hf(directory: Path) -> None:
    """The unquantized SmolLM2 as a Hugging Face checkpoint (what bitsandbytes + PEFT start from)."""
    from nemo_quant.export import ExportConfig, export_checkpoint
    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, teardown

    init_megatron(ParallelLayout(1, 1))
    loaded = load_model(None)
    export_checkpoint(loaded.model, loaded.source.arch, ExportConfig(format="hf", path=str(directory), dtype="float32"),
                      loaded.tokenizer)
    teardown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        row = child_bnb(args.hf_dir, args.steps, args.windows) if args.child == "bnb_peft" else \
            child_ours(args.child, args.steps, args.windows)
        row["peak_rss_process_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print("RESULT " + json.dumps(row), flush=True)
        return

    RESULTS.mkdir(exist_ok=True)
    previous = json.loads((RESULTS / "qlora.json").read_text())["runs"] if (RESULTS / "qlora.json").is_file() else []
    rows = [r for r in previous if r["key"] not in args.runs.split(",")]  # runs not re-run now are kept
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2_hf"
        if "bnb_peft" in args.runs:
            _export_hf(hf_dir)
        for key in args.runs.split(","):
            cmd = [sys.executable, __file__, "--child", key, "--steps", str(args.steps), "--windows", str(args.windows),
                   "--hf-dir", str(hf_dir)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
            row = {"key": key, "run": RUNS[key][0]}
            row.update(json.loads(found[-1][7:]) if found else {"error": proc.stderr[-2000:]})
            rows.append(row)
            print(json.dumps(row), flush=True)
            with open(RESULTS / "qlora.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
    meta = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized), bf16 compute, fp32 adapters",
            "protocol": f"{args.steps} steps x 512 tokens, AdamW (0.9, 0.95), lr {LR} after {WARMUP} warm-up steps, "
                        f"r {RANK}, alpha {ALPHA}, every decoder linear; Persuasion {args.windows} x 512",
            "machine": f"{platform.machine()} {psutil.cpu_count()} cpus, torch threads {torch.get_num_threads()}",
            "fp32 baseline perplexity": _fp32_baseline()}
    rows.sort(key=lambda r: list(RUNS).index(r["key"]))
    (RESULTS / "qlora.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    lines = ["| run | base bits/param | ppl untrained | ppl after | median step (s) | peak RSS training (GiB) | "
             "peak RSS process (GiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['run']} | error: {r['error'][-120:]!r} | | | | | |")
            continue
        lines.append(f"| {r['run']} | {r['bits_per_param']:.3f} | {r['ppl_before']:.2f} | {r['ppl_after']:.2f} | "
                     f"{r['median_step_s']:.2f} | {r['peak_rss_train_gib']:.2f} | {r['peak_rss_process_gib']:.2f} |")
    table = "\n".join([f"- {k}: {v}" for k, v in meta.items()] + ["", *lines])
    (RESULTS / "qlora.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
