"""Speculative heads on SmolLM2-135M (BENCHMARKS.md, "Speculative heads"): Medusa, EAGLE-1, EAGLE-3
and MTP trained on the same self-distilled data and budget, then their acceptance lengths.

Each step is the command a user runs, in its own process, one after another:
  nemo-quant train speculative=<preset> ...      heads on the frozen base (self-distilled data, cached)
  nemo-quant eval checkpoint.load=<dir>/step_N   tau for k = 1, 3, 5 + per-position acceptance
Data: the first 128 tokens of the first steps x micro-batch training windows (the calibration
novels), each continued greedily by the base for 64 tokens. Budget: 200 steps x 4 sequences of
191 tokens, AdamW (0.9, 0.95), lr 1e-3 after 10 warm-up steps, seed 1234. Acceptance: 64 Persuasion
prompts of 128 tokens at 1024 * i and the base's 64-token greedy continuations.

    .venv/bin/python benchmarks/speculative.py [--runs medusa,eagle1,eagle3,mtp] [--steps 200]
Rows are appended to results/speculative.jsonl; results/speculative.md holds the latest row per run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from cli_run import run_cli

RESULTS = Path(__file__).parent / "results"
RUNS = {"medusa": "medusa", "eagle1": "eagle1", "eagle3": "eagle3", "eagle3_d2t": "eagle3_d2t", "mtp": "mtp"}


def run(name: str, steps: int, micro_batch: int, work: Path) -> dict:
    ckpt = work / name
    train = run_cli(["train", f"speculative={RUNS[name]}", f"train.steps={steps}", f"train.save_every={steps}",
                  f"train.micro_batch_size={micro_batch}", "train.lr=1e-3", "train.warmup_steps=10",
                  "train.adam_betas=[0.9,0.95]", "train.seq_length=512", "train.resume=false",
                  f"checkpoint.save={ckpt}"], work / f"t_{name}")
    evaluated = run_cli(["eval", f"checkpoint.load={ckpt / f'step_{steps}'}", "data.eval_samples=4"], work / f"e_{name}")
    acc = evaluated["acceptance"]
    return {"run": name, "steps": steps, "micro_batch": micro_batch, "train_tokens": steps * micro_batch * 191,
            "loss_first": train["losses"][0], "loss_last": train["losses"][-1], "train_wall_s": train["wall_s"],
            "tau": acc["tau"], "accept_rate": acc["accept_rate"], "top1": acc["top1"], "prompts": acc["prompts"],
            "base_ppl": evaluated["perplexity"], "eval_wall_s": evaluated["wall_s"],
            "date": time.strftime("%Y-%m-%d %H:%M")}


def write_table(rows: dict[str, dict]) -> str:
    lines = ["| heads | tau k=1 | tau k=3 | tau k=5 | top-1 by draft position | loss first -> last | train wall |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        tau = {int(k): v for k, v in r["tau"].items()}
        cells = [f"{tau[k]:.3f}" if k in tau else "-" for k in (1, 3, 5)]
        top1 = " ".join(f"{a:.3f}" for a in r["top1"])
        lines.append(f"| {name} | {' | '.join(cells)} | {top1} | {r['loss_first']:.3f} -> {r['loss_last']:.3f} | "
                     f"{r['train_wall_s'] / 60:.1f} min |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="medusa,eagle1,eagle3,mtp")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    latest = {}
    if (RESULTS / "speculative.json").is_file():
        latest = json.loads((RESULTS / "speculative.json").read_text())
    with tempfile.TemporaryDirectory(prefix="nq_spec_") as tmp:
        for name in args.runs.split(","):
            row = run(name, args.steps, args.micro_batch, Path(tmp))
            print(json.dumps(row), flush=True)
            with (RESULTS / "speculative.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")
            latest[name] = row
            (RESULTS / "speculative.json").write_text(json.dumps(latest, indent=2))
            (RESULTS / "speculative.md").write_text(write_table(latest))


if __name__ == "__main__":
    main()
