"""Shared steps of the commands: start-up, model loading, reporting."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from nemo_quant.models.loading import LoadedModel, load_model
from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, is_main_rank, teardown


@contextmanager
def megatron_session(cfg: DictConfig):
    init_megatron(ParallelLayout(cfg.parallel.tp, cfg.parallel.pp), cfg.seed, cfg.parallel.timeout_s)
    try:
        yield
    finally:
        teardown()


def load_for_command(cfg: DictConfig) -> LoadedModel:
    """The configured model; from a nemo_quant checkpoint (modes replayed) when checkpoint.load is set."""
    from nemo_quant.checkpoint.model_checkpoint import holds_base, load_into

    with_weights = cfg.checkpoint.load is None or not holds_base(cfg.checkpoint.load)
    loaded = load_model(cfg.model.path, cfg.model.dtype.value, cfg.model.tokenizer, with_weights=with_weights)
    if cfg.checkpoint.load is not None:
        load_into(loaded.model, cfg.checkpoint.load)
    return loaded


def quant_config(cfg: DictConfig):
    return OmegaConf.to_object(cfg.quant)


def configured_modes(cfg: DictConfig, model=None) -> list[tuple[str, object]]:
    """The job's modes in canonical order (prune, sparsity, quantize or qlora, speculative heads), less
    those `model` already carries (a checkpoint that was pruned or quantized before)."""
    from nemo_quant.modes import mode_state

    done = {m["name"] for m in mode_state(model)} if model is not None else set()
    modes = []
    if cfg.get("prune") is not None and "prune" not in done:
        modes.append(("prune", OmegaConf.to_object(cfg.prune)))
    if cfg.sparsity is not None and "sparsity" not in done:
        modes.append(("sparsity", OmegaConf.to_object(cfg.sparsity)))
    if cfg.quant is not None and "quantize" not in done:
        modes.append(("quantize", quant_config(cfg)))
    if cfg.get("qlora") is not None and "qlora" not in done:
        modes.append(("qlora", OmegaConf.to_object(cfg.qlora)))
    if cfg.get("speculative") is not None:
        from nemo_quant.speculative.config import MODE_OF_METHOD, Method

        name = MODE_OF_METHOD[Method(cfg.speculative.method)]
        if name not in done:
            modes.append((name, OmegaConf.to_object(cfg.speculative)))
    return modes


def apply_with_data(cfg: DictConfig, model, modes: list[tuple[str, object]], calib, plan_quant=None) -> dict:
    """Apply `modes` in order, each followed by its data step (sparsity chooses its masks before
    quantization is applied and calibrated on the pruned weights). `plan_quant(qcfg)` may
    replace the quantize config (auto mixed precision). Returns each step's report by mode."""
    from nemo_quant.modes import apply_modes, get_mode
    from nemo_quant.quantization.forward_loop import windows_forward_loop

    reports = {}
    loop = windows_forward_loop(calib, cfg.data.batch_size)
    for name, mode_cfg in modes:
        if name == "quantize" and plan_quant is not None:
            mode_cfg = plan_quant(mode_cfg)
        apply_modes(model, [(name, mode_cfg)])
        step = get_mode(name).data_step
        reports[name] = step(model, loop) if step is not None else None
    return reports


def print_table(rows: list[dict[str, object]]) -> None:
    if not is_main_rank() or not rows:
        return
    headers = list(rows[0])
    widths = [max(len(str(h)), *(len(str(r[h])) for r in rows)) for h in headers]
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)) + " |", flush=True)


def report(lines: dict[str, object]) -> None:
    if is_main_rank():
        width = max(map(len, lines))
        for key, value in lines.items():
            print(f"{key:<{width}}  {value}", flush=True)


def write_results(results: dict) -> None:
    if not is_main_rank():
        return
    from hydra.core.hydra_config import HydraConfig

    out = Path(HydraConfig.get().runtime.output_dir) / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str))
