"""Which importance score prunes SmolLM2 best, one-shot (no training): Persuasion perplexity of the
FFN 1536 -> 1024 and 30 -> 22 layer targets under each channel / layer score. Scored through the
masked view (equal to the pruned model's loss, tests/unit/test_pruning.py), so one model serves
every variant. `--iterative` adds the greedy skip-loss (212 forwards of 4 windows: slow on CPU).

    .venv/bin/python benchmarks/pruning_scores.py [--iterative]
Writes results/pruning_scores.json.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from omegaconf import OmegaConf

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterative", action="store_true")
    args = parser.parse_args()

    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.models.loading import load_model
    from nemo_quant.pruning.decide import Sizes, make_plan
    from nemo_quant.pruning.importance import measure_importance
    from nemo_quant.pruning.masked_view import masked_loss
    from nemo_quant.pruning.search import iterative_skip_scores, skip_losses
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(1, 1), 1234, 600)
    loaded = load_model(None)
    data = OmegaConf.create({"name": "austen", "seq_length": 512, "calib_samples": 32, "eval_samples": 32,
                             "batch_size": 1, "calib_files": [], "eval_files": [], "jsonl_field": "text"})
    calib, evals = calibration_windows(data, loaded.tokenizer), evaluation_windows(data, loaded.tokenizer)
    model, results = loaded.model, {}
    from nemo_quant.eval.perplexity import perplexity

    baseline = perplexity(model, evals, loaded.vocab_size).perplexity

    def score(name, importance, sizes):
        results[name] = math.exp(masked_loss(model, make_plan(importance, sizes, model.config.num_query_groups), evals))
        print(f"{name}: {results[name]:.3f}", flush=True)

    ffn, depth = Sizes(30, 576, 9, 3, 1024), Sizes(22, 576, 9, 3, 1536)
    activation = measure_importance(model, windows_forward_loop(calib), "activation")
    output = measure_importance(model, windows_forward_loop(calib), "output")
    score("ffn1024 channel_score=activation", activation, ffn)
    score("ffn1024 channel_score=output", output, ffn)
    score("layers22 layer_score=block_influence", activation, depth)
    activation.layers = skip_losses(model, calib[:4])
    score("layers22 layer_score=skip_loss", activation, depth)
    if args.iterative:
        activation.layers = iterative_skip_scores(model, calib[:4], 22)
        score("layers22 layer_score=iterative_skip_loss", activation, depth)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pruning_scores.json").write_text(json.dumps({"baseline_ppl": baseline, "perplexity": results}, indent=2))


if __name__ == "__main__":
    main()
