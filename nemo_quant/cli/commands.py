"""What each `nemo-quant` command does, given a validated config."""
from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import DictConfig

from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, is_main_rank, teardown


def _report(lines: dict[str, object]) -> None:
    if is_main_rank():
        width = max(map(len, lines))
        for key, value in lines.items():
            print(f"{key:<{width}}  {value}", flush=True)


def _output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def run_eval(cfg: DictConfig) -> None:
    from nemo_quant.data.datasets import evaluation_windows
    from nemo_quant.data.windows import fingerprint
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model

    start = time.perf_counter()
    init_megatron(ParallelLayout(cfg.parallel.tp, cfg.parallel.pp), cfg.seed, cfg.parallel.timeout_s)
    try:
        loaded = load_model(cfg.model.path, cfg.model.dtype, cfg.model.tokenizer)
        windows = evaluation_windows(cfg.data, loaded.tokenizer)
        load_s = time.perf_counter() - start
        result = perplexity(loaded.model, windows, loaded.vocab_size, cfg.data.batch_size)
        total_s = time.perf_counter() - start
        summary = {
            "model": cfg.model.name,
            "data": f"{cfg.data.name.value} eval {tuple(windows.shape)} sha256:{fingerprint(windows)}",
            "parallel": f"tp={cfg.parallel.tp} pp={cfg.parallel.pp}",
            "perplexity": f"{result.perplexity:.4f}",
            "load_s": f"{load_s:.1f}",
            "total_s": f"{total_s:.1f}",
        }
        _report(summary)
        if is_main_rank():
            (_output_dir() / "results.json").write_text(json.dumps(
                {**summary, "perplexity": result.perplexity, "nll_sum": result.nll_sum, "predictions": result.predictions}, indent=2))
    finally:
        teardown()


COMMANDS = {"eval": run_eval}
