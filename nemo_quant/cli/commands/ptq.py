"""`nemo-quant ptq`: quantize, calibrate, compare perplexity before/after, optionally save."""
from __future__ import annotations

import time

import psutil
from omegaconf import DictConfig

from nemo_quant.cli.commands.common import (
    apply_with_data, configured_modes, load_for_command, megatron_session, print_table, report, write_results,
)


def _auto_plan(cfg: DictConfig, model, calib, qcfg):
    """Auto mixed precision: choose per-layer formats, write the plan as a quant preset."""
    from pathlib import Path

    from nemo_quant.quantization.mixed_precision import auto_plan, write_plan
    from nemo_quant.runtime.distributed_init import is_main_rank

    plan, summary = auto_plan(model, calib, qcfg, cfg.data.batch_size)
    path = Path(qcfg.auto.plan_path or Path(_run_dir()) / "quant" / "auto_plan.yaml")
    if is_main_rank():
        write_plan(plan, path)
        shares = ", ".join(f"{k[6:]} {v:.0%}" for k, v in summary.items() if k.startswith("share_"))
        print(f"[nemo_quant] auto mixed precision: {summary['effective_bits']:.3f} effective bits ({shares}); "
              f"plan written to {path.resolve()} (reuse: --config-dir {path.resolve().parent.parent} quant={path.stem})",
              flush=True)
    return plan


def _run_dir() -> str:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else "."


def baseline_perplexity(cfg: DictConfig, loaded, evals) -> float:
    """The unquantized perplexity: from the cache when an earlier run measured the same thing
    (rank 0 decides, so every rank agrees whether to evaluate), else measured and stored."""
    from nemo_quant.distributed import gather_messages
    from nemo_quant.eval.baseline_cache import baseline_key, cached_baseline, store_baseline
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import resolve_model_path
    from nemo_quant.runtime.distributed_init import is_main_rank

    def measure() -> float:
        return perplexity(loaded.model, evals, loaded.vocab_size, cfg.data.batch_size).perplexity

    if not cfg.baseline_cache or cfg.checkpoint.load is not None:
        return measure()
    model_path = resolve_model_path(cfg.model.path)
    key = baseline_key(model_path, evals, cfg.model.dtype.value, cfg.parallel.tp, cfg.parallel.pp, cfg.data.batch_size)
    found = cached_baseline(key) if is_main_rank() else None
    found = gather_messages(None if found is None else repr(found))[0]
    if found is not None:
        report({"baseline": f"{float(found):.3f} (cached: same weights, evaluation tokens, dtype and layout; "
                            "baseline_cache=false re-evaluates)"})
        return float(found)
    value = measure()
    if is_main_rank():
        store_baseline(key, value, {"model": str(model_path), "dtype": cfg.model.dtype.value, "tp": cfg.parallel.tp,
                                    "pp": cfg.parallel.pp, "windows": list(evals.shape)})
    return value


def run_ptq(cfg: DictConfig) -> None:
    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.modes import mode_config
    from nemo_quant.preflight import preflight

    with megatron_session(cfg):
        loaded = load_for_command(cfg)
        modes = configured_modes(cfg, loaded.model)
        preflight(loaded.model, loaded.source.arch, modes, cfg.export)
        calib = calibration_windows(cfg.data, loaded.tokenizer)
        evals = evaluation_windows(cfg.data, loaded.tokenizer)
        before = baseline_perplexity(cfg, loaded, evals)

        start = time.perf_counter()
        plan_quant = (lambda qcfg: _auto_plan(cfg, loaded.model, calib, qcfg) if qcfg.auto is not None else qcfg)
        reports = apply_with_data(cfg, loaded.model, modes, calib, plan_quant)
        calib_s = time.perf_counter() - start

        after = perplexity(loaded.model, evals, loaded.vocab_size, cfg.data.batch_size).perplexity
        rss_gib = psutil.Process().memory_info().rss / 2**30
        delta = 100.0 * (after - before) / before
        label = " + ".join(mode_config(loaded.model, name).name for name, _ in modes)  # auto: the plan's name
        print_table([
            {"model": cfg.model.name, "format": "baseline", "perplexity": f"{before:.3f}", "delta %": "", "calib s": ""},
            {"model": cfg.model.name, "format": label, "perplexity": f"{after:.3f}",
             "delta %": f"{delta:+.2f}", "calib s": f"{calib_s:.1f}"},
        ])
        if cfg.checkpoint.save is not None:
            from nemo_quant.checkpoint.model_checkpoint import save_model

            save_model(loaded.model, loaded.source.arch, cfg.checkpoint.save, cfg.checkpoint.overwrite)
        exported = {}
        if cfg.export is not None:
            from nemo_quant.cli.commands.export import export_step

            exported = export_step(cfg, loaded)
        sparsified = reports.get("sparsity")
        write_results({"preset": label, "baseline_ppl": before, "quant_ppl": after, "delta_pct": delta,
                       "calib_s": calib_s, "rss_gib": rss_gib, "checkpoint": cfg.checkpoint.save,
                       **({"sparsify_s": sparsified.seconds} if sparsified is not None else {}), **exported})
