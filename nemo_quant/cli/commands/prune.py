"""`nemo-quant prune`: one-shot Minitron pruning; perplexity and parameter count before/after,
optionally a checkpoint (then `nemo-quant train checkpoint.load=... distill=logits` recovers it)."""
from __future__ import annotations

import time

import psutil
from omegaconf import DictConfig

from nemo_quant.cli.commands.common import (
    apply_with_data, configured_modes, load_for_command, megatron_session, print_table, write_results,
)


def run_prune(cfg: DictConfig) -> None:
    from nemo_quant.cli.commands.ptq import baseline_perplexity
    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.preflight import preflight

    with megatron_session(cfg):
        loaded = load_for_command(cfg)
        modes = configured_modes(cfg, loaded.model)
        preflight(loaded.model, loaded.arch, modes, cfg.export)
        calib = calibration_windows(cfg.data, loaded.tokenizer)
        evals = evaluation_windows(cfg.data, loaded.tokenizer)
        before_arch = loaded.arch
        before = baseline_perplexity(cfg, loaded, evals)
        start = time.perf_counter()
        report = apply_with_data(cfg, loaded.model, modes, calib).get("prune") or {}
        seconds = time.perf_counter() - start
        after = perplexity(loaded.model, evals, loaded.vocab_size, cfg.data.batch_size).perplexity
        arch = loaded.arch
        print_table([
            {"model": cfg.model.name, "shape": "before", "params": f"{before_arch.parameter_count():,}",
             "perplexity": f"{before:.3f}", "delta %": "", "prune s": ""},
            {"model": cfg.model.name, "shape": _shape(arch), "params": f"{arch.parameter_count():,}",
             "perplexity": f"{after:.3f}", "delta %": f"{100 * (after - before) / before:+.2f}",
             "prune s": f"{seconds:.1f}"},
        ])
        if cfg.checkpoint.save is not None:
            from nemo_quant.checkpoint.model_checkpoint import save_model

            save_model(loaded.model, loaded.source.arch, cfg.checkpoint.save, cfg.checkpoint.overwrite)
        exported = {}
        if cfg.export is not None:
            from nemo_quant.cli.commands.export import export_step

            exported = export_step(cfg, loaded)
        write_results({"baseline_ppl": before, "pruned_ppl": after, "params_before": before_arch.parameter_count(),
                       "params_after": arch.parameter_count(), "sizes": report.get("sizes"), "prune_s": seconds,
                       "searched": report.get("searched"), "rss_gib": psutil.Process().memory_info().rss / 2**30,
                       "checkpoint": cfg.checkpoint.save, **exported})


def _shape(arch) -> str:
    return (f"L{arch.num_layers} h{arch.hidden_size} heads {arch.num_attention_heads}/{arch.num_query_groups} "
            f"ffn {arch.ffn_hidden_size}")
