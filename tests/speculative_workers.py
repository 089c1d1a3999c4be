"""Spawned-rank functions of the speculative-heads tests (module-level for the spawn context)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch


def _init(tp: int, pp: int = 1) -> None:
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)


def _digests(directory: str):
    from nemo_quant.runtime.distributed_init import is_main_rank

    if not is_main_rank():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def _export(model, path: str):
    from nemo_quant.export.writer import export_checkpoint
    from tests.tiny_models import TINY

    export_checkpoint(model, TINY, {"format": "draft", "path": path, "dtype": "float32"})
    return _digests(path)


def heads_run(tp: int, cfgs: list[dict], sequences: torch.Tensor, steps: int, work: str) -> dict:
    """Per method at TP=tp: the fresh draft's export digests, the losses, tau, the trained draft
    (gathered) and its export digests; the trained model is saved to <work>/<method>/ck."""
    from nemo_quant.checkpoint.model_checkpoint import save_model
    from nemo_quant.eval.acceptance import measure_acceptance
    from nemo_quant.export.gather import gather_module
    from nemo_quant.modes import apply_modes
    from nemo_quant.speculative.mode import ATTR
    from tests.speculative_helpers import METHOD_MODE, lively_model, train_heads
    from tests.tiny_models import TINY

    _init(tp)
    out = {}
    for cfg in cfgs:
        name, where = cfg["name"], Path(work) / cfg["name"]
        fresh = lively_model()
        apply_modes(fresh, [(METHOD_MODE[cfg["method"]], cfg)])
        fresh_digests = _export(fresh, str(where / "fresh"))
        probe = lively_model()
        train_heads(probe, cfg, sequences, 1, lr=0.0)  # one backward, no update: the first gradients
        grads = _gathered_grads(getattr(probe, ATTR))
        model = lively_model()
        losses = train_heads(model, cfg, sequences, steps)
        tau = measure_acceptance(model, sequences, 16, (1, 3)).tau
        params = gather_module(getattr(model, ATTR))
        save_model(model, TINY, where / "ck")
        out[name] = {"fresh": fresh_digests, "losses": losses, "tau": tau, "params": params, "grads": grads,
                     "trained": _export(model, str(where / "trained"))}
    return out


def _gathered_grads(module) -> dict[str, torch.Tensor]:
    """Every parameter's gradient, TP-gathered like the parameter (collective)."""
    from megatron.core import parallel_state as ps

    from nemo_quant.export.gather import _gather, _tp_axis
    from nemo_quant.models.megatron_layout import fc1_rows_in_tp1_order

    out = {}
    for mod_name, owner in module.named_modules():
        for name, p in owner.named_parameters(recurse=False):
            full = _gather(p.grad, _tp_axis(owner, name, p))
            if mod_name.endswith("linear_fc1"):  # per-rank [gate; up] blocks -> TP=1's order
                full = fc1_rows_in_tp1_order(full, ps.get_tensor_model_parallel_world_size())
            out[f"{mod_name}.{name}"] = full
    return out


def reload_and_export(tp: int, ckpt: str, path: str):
    """Load a heads-only checkpoint onto the lively base at TP=tp and export its draft."""
    from nemo_quant.checkpoint.model_checkpoint import load_into
    from tests.speculative_helpers import lively_model

    _init(tp)
    return _export(load_into(lively_model(), ckpt), path)


def apply_at(tp: int, pp: int, cfg: dict) -> str:
    """The error applying heads at TP x PP raises on this rank."""
    from nemo_quant.modes import apply_modes
    from tests.speculative_helpers import METHOD_MODE, lively_model

    _init(tp, pp)
    try:
        apply_modes(lively_model(), [(METHOD_MODE[cfg["method"]], cfg)])
    except Exception as e:  # noqa: BLE001 - the message is the result
        return f"{type(e).__name__}: {e}"
    return "applied"
