"""`nemo-quant eval`: perplexity of a model (or a nemo_quant checkpoint) on the evaluation windows."""
from __future__ import annotations

import time

from omegaconf import DictConfig

from nemo_quant.cli.commands.common import load_for_command, megatron_session, report, write_results


def run_eval(cfg: DictConfig) -> None:
    from nemo_quant.data.datasets import evaluation_windows
    from nemo_quant.data.windows import fingerprint
    from nemo_quant.eval.perplexity import perplexity

    start = time.perf_counter()
    with megatron_session(cfg):
        loaded = load_for_command(cfg)
        windows = evaluation_windows(cfg.data, loaded.tokenizer)
        load_s = time.perf_counter() - start
        result = perplexity(loaded.model, windows, loaded.vocab_size, cfg.data.batch_size)
        summary = {
            "model": cfg.model.name + (f" + {cfg.checkpoint.load}" if cfg.checkpoint.load else ""),
            "data": f"{cfg.data.name.value} eval {tuple(windows.shape)} sha256:{fingerprint(windows)}",
            "parallel": f"tp={cfg.parallel.tp} pp={cfg.parallel.pp}",
            "perplexity": f"{result.perplexity:.4f}",
            "load_s": f"{load_s:.1f}",
            "total_s": f"{time.perf_counter() - start:.1f}",
        }
        extra = {}
        from nemo_quant.speculative.jobs import acceptance_report, heads_config

        if heads_config(loaded.model) is not None or cfg.get("speculative") is not None:
            extra["acceptance"] = acceptance_report(cfg, loaded.model, loaded.tokenizer, loaded.vocab_size)
            summary["tau (k: tokens/step)"] = ", ".join(f"k={k}: {t:.3f}" for k, t in extra["acceptance"]["tau"].items())
            summary["draft top-1 by position"] = " ".join(f"{a:.3f}" for a in extra["acceptance"]["top1"])
        report(summary)
        write_results({**summary, **extra, "perplexity": result.perplexity, "nll_sum": result.nll_sum, "predictions": result.predictions})
