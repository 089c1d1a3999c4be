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
        report(summary)
        write_results({**summary, "perplexity": result.perplexity, "nll_sum": result.nll_sum, "predictions": result.predictions})
