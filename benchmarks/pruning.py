"""Minitron pruning + distillation recovery on SmolLM2-135M (BENCHMARKS.md, "Pruning").

Each step is the `nemo-quant` command a user runs, in its own process, one after another:
  nemo-quant prune prune=<target> checkpoint.save=<dir>            one-shot (perplexity before/after)
  nemo-quant train checkpoint.load=<dir> distill=logits ...        200-step KL recovery (teacher: FP32)
  nemo-quant train checkpoint.load=<dir> ...                       the same budget, plain LM loss
  nemo-quant eval checkpoint.load=<run>/step_200                   Persuasion perplexity
Targets: width ffn_hidden_size=1024, depth num_layers=22, and a parameter budget the search meets
(the width target's count). Training protocol: 200 windows of 513 tokens, micro-batch 1, AdamW
(0.9, 0.95), lr 1e-5 after 10 warm-up steps, seed 1234.

    .venv/bin/python benchmarks/pruning.py [--runs ffn,ffn_lm,depth,budget] [--steps 200]
Rows are appended to results/pruning.jsonl as they finish; results/pruning.{json,md} at the end.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
TARGETS = {"ffn": "minitron_ffn", "depth": "minitron_depth", "budget": "minitron_budget"}
# run name -> (target, training objective)
RUNS = {"ffn": ("ffn", "distill"), "ffn_lm": ("ffn", "lm"), "depth": ("depth", "distill"),
        "budget": ("budget", "distill")}
TRAIN = ["train.lr=1e-5", "train.warmup_steps=10", "train.adam_betas=[0.9,0.95]", "train.micro_batch_size=1",
         "train.seq_length=512", "train.resume=false"]


def _cli(args: list[str], run_dir: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nemo_quant.cli.main", *args, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads((run_dir / "results.json").read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="ffn,ffn_lm,depth,budget")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    pruned: dict[str, dict] = {}
    rows = []
    for run in args.runs.split(","):
        target, objective = RUNS[run]
        ckpt = work / f"pruned_{target}"
        if target not in pruned:
            pruned[target] = _cli(["prune", f"prune={TARGETS[target]}", f"checkpoint.save={ckpt}"], work / f"p_{target}")
        one_shot = pruned[target]
        train_args = ["train", f"checkpoint.load={ckpt}", f"checkpoint.save={work / run}", f"train.steps={args.steps}",
                      f"train.save_every={args.steps}", *TRAIN, *(["distill=logits"] if objective == "distill" else [])]
        trained = _cli(train_args, work / f"t_{run}")
        final = _cli(["eval", f"checkpoint.load={work / run / f'step_{args.steps}'}"], work / f"e_{run}")
        row = {"run": run, "target": TARGETS[target], "objective": objective, "sizes": one_shot["sizes"],
               "params_before": one_shot["params_before"], "params_after": one_shot["params_after"],
               "baseline_ppl": one_shot["baseline_ppl"], "one_shot_ppl": one_shot["pruned_ppl"],
               "prune_s": one_shot["prune_s"], "trained_ppl": final["perplexity"], "steps": args.steps,
               "train_wall_s": trained["wall_s"], "first_loss": trained["losses"][0], "last_loss": trained["losses"][-1]}
        row["gap_closed"] = 1 - (row["trained_ppl"] - row["baseline_ppl"]) / (row["one_shot_ppl"] - row["baseline_ppl"])
        rows.append(row)
        with open(RESULTS / "pruning.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    (RESULTS / "pruning.json").write_text(json.dumps({"rows": rows}, indent=2))
    lines = ["| run | sizes | params | one-shot ppl | after 200 steps | gap closed | train wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sizes"]
        shape = f"L{s['num_layers']} h{s['hidden_size']} heads {s['num_attention_heads']}/{s['num_query_groups']} ffn {s['ffn_hidden_size']}"
        lines.append(f"| {r['run']} ({r['objective']}) | {shape} | {r['params_after'] / 1e6:.1f}M | {r['one_shot_ppl']:.2f} | "
                     f"{r['trained_ppl']:.2f} | {r['gap_closed']:.0%} | {r['train_wall_s']:.0f} |")
    (RESULTS / "pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
