"""Minitron pruning + distillation recovery, and QAT vs QAD, on SmolLM2-135M (BENCHMARKS.md,
"Pruning" and "Recovery figures"), side by side with ModelOpt 0.43's mcore_minitron.

Each step is the command a user runs, in its own process, one after another:
  nemo-quant prune prune=<target> checkpoint.save=<dir>            one-shot (perplexity before/after)
  nemo-quant ptq quant=<preset> checkpoint.save=<dir>              one-shot PTQ (for QAT / QAD)
  <minitron venv> benchmarks/modelopt_minitron.py --target ...      ModelOpt's one-shot, as an HF directory
  nemo-quant train <start> distill=logits ...                      200-step KL recovery (teacher: FP32)
  nemo-quant train <start> ...                                     the same budget, plain LM loss (QAT)
  nemo-quant eval <start>/step_200                                 Persuasion perplexity
Targets: width ffn_hidden_size=1024, depth num_layers=22, and a parameter budget the search meets
(the width target's count). Training protocol: 200 windows of 513 tokens, micro-batch 1, AdamW
(0.9, 0.95), lr 1e-5 after 10 warm-up steps, seed 1234.

    .venv/bin/python benchmarks/pruning.py [--runs ffn,ffn_lm,...] [--steps 200] [--modelopt .venv-minitron/bin/python]
Rows are appended to results/pruning.jsonl as they finish; results/pruning.{json,md} hold the
latest row of every run.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from pathlib import Path

from cli_run import run_cli

RESULTS = Path(__file__).parent / "results"
TARGETS = {"ffn": "minitron_ffn", "depth": "minitron_depth", "budget": "minitron_budget"}
# run name -> (start point, target or preset, training objective)
RUNS = {"ffn": ("prune", "ffn", "distill"), "ffn_lm": ("prune", "ffn", "lm"),
        "depth": ("prune", "depth", "distill"), "depth_lm": ("prune", "depth", "lm"),
        "budget": ("prune", "budget", "distill"),
        "mo_ffn": ("modelopt", "ffn", "distill"), "mo_depth": ("modelopt", "depth", "distill"),
        "w4a8_qat": ("ptq", "w4a8_awq", "lm"), "w4a8_qad": ("ptq", "w4a8_awq", "distill"),
        "nvfp4_qat": ("ptq", "nvfp4", "lm"), "nvfp4_qad": ("ptq", "nvfp4", "distill")}
TRAIN = ["train.lr=1e-5", "train.warmup_steps=10", "train.adam_betas=[0.9,0.95]", "train.micro_batch_size=1",
         "train.seq_length=512", "train.resume=false"]


def _start(kind: str, target: str, work: Path, modelopt: str | None) -> tuple[dict, list[str]]:
    """The one-shot result and the overrides that make a run start from it."""
    ckpt = work / f"{kind}_{target}"
    if kind == "prune":
        r = run_cli(["prune", f"prune={TARGETS[target]}", f"checkpoint.save={ckpt}"], work / f"s_{kind}_{target}")
        return {**r, "one_shot_ppl": r["pruned_ppl"]}, [f"checkpoint.load={ckpt}"]
    if kind == "ptq":
        r = run_cli(["ptq", f"quant={target}", f"checkpoint.save={ckpt}"], work / f"s_{kind}_{target}")
        return {**r, "one_shot_ppl": r["quant_ppl"], "sizes": None}, [f"checkpoint.load={ckpt}"]
    if modelopt is None:
        raise SystemExit("ModelOpt runs need --modelopt <python of the minitron venv> (make minitron-venv)")
    from nemo_quant.models.loading import default_model_path

    out = work / f"s_modelopt_{target}.json"
    proc = subprocess.run([modelopt, str(Path(__file__).parent / "modelopt_minitron.py"), "--target", target,
                           "--out", str(ckpt), "--results", str(out)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"ModelOpt {target} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text()), [f"model.path={ckpt}", f"distill.teacher={default_model_path()}"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--modelopt", default=None, help="python of the ModelOpt 0.43 venv (make minitron-venv)")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_pruning_"))
    starts: dict[tuple, tuple[dict, list[str]]] = {}
    for run in args.runs.split(","):
        kind, target, objective = RUNS[run]
        if (kind, target) not in starts:
            starts[kind, target] = _start(kind, target, work, args.modelopt)
        one_shot, start = starts[kind, target]
        model = [a for a in start if a.startswith("model.path=")]
        distill = ["distill=logits", *[a for a in start if a.startswith("distill.")]] if objective == "distill" else []
        train_args = ["train", *[a for a in start if not a.startswith("distill.")], f"checkpoint.save={work / run}",
                      f"train.steps={args.steps}", f"train.save_every={args.steps}", *TRAIN, *distill]
        trained = run_cli(train_args, work / f"t_{run}")
        final = run_cli(["eval", *model, f"checkpoint.load={work / run / f'step_{args.steps}'}"], work / f"e_{run}")
        row = {"run": run, "start": kind, "target": target, "objective": objective, "sizes": one_shot.get("sizes"),
               "params_after": one_shot.get("params_after"), "baseline_ppl": one_shot["baseline_ppl"],
               "one_shot_ppl": one_shot["one_shot_ppl"], "trained_ppl": final["perplexity"], "steps": args.steps,
               "train_wall_s": trained["wall_s"], "first_loss": trained["losses"][0], "last_loss": trained["losses"][-1]}
        row["gap_closed"] = 1 - (row["trained_ppl"] - row["baseline_ppl"]) / (row["one_shot_ppl"] - row["baseline_ppl"])
        with open(RESULTS / "pruning.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    write_tables()


def write_tables() -> None:
    """pruning.{json,md} from the latest row of every run in pruning.jsonl."""
    latest = {}
    for line in (RESULTS / "pruning.jsonl").read_text().splitlines():
        row = json.loads(line)
        latest[row["run"]] = row
    rows = [latest[r] for r in RUNS if r in latest]
    (RESULTS / "pruning.json").write_text(json.dumps({"rows": rows}, indent=2))
    lines = ["| run | start | shape | params | one-shot ppl | after 200 steps | gap closed |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["sizes"]
        shape = (f"L{s['num_layers']} h{s['hidden_size']} heads {s['num_attention_heads']}/{s['num_query_groups']} "
                 f"ffn {s['ffn_hidden_size']}") if s else r["target"]
        params = f"{r['params_after'] / 1e6:.1f}M" if r.get("params_after") else "134.5M"
        lines.append(f"| {r['run']} ({r['objective']}) | {r['start']} | {shape} | {params} | {r['one_shot_ppl']:.2f} | "
                     f"{r['trained_ppl']:.2f} | {r['gap_closed']:.0%} |")
    (RESULTS / "pruning.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
