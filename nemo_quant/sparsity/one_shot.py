"""`sparsify(model, forward_loop)`: choose the masks (and reconstructed weights) of a model the
sparsity mode was applied to.

`magnitude` needs no data: each rank masks its own slice (a group of m never straddles
ranks, the mode's check makes sure), which is TP=1's mask. The data methods run sequentially,
one transformer layer at a time (runtime/layer_replay.py): the layer's linear layers are
observed on inputs that already went through the pruned layers before it (the statistics
pass of the quantization algorithms: row-parallel inputs gathered over TP, Hessians summed
over DP), solved on the whole TP-gathered weight on every rank, and the layer is replayed to
feed the next. Linear layers outside the decoder layers (an untied output layer) are
observed in one last full pass.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from nemo_quant.distributed import max_over_world
from nemo_quant.modes import mode_config
from nemo_quant.quantization.algorithms.linear_view import LinearView
from nemo_quant.quantization.algorithms.observe import Needs, observing
from nemo_quant.quantization.forward_loop import CalibrationError, run_forward_loop_everywhere
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.runtime.layer_replay import record_stage_inputs, replay
from nemo_quant.sparsity import solvers
from nemo_quant.sparsity.config import SparsityConfig, SparsityMethod
from nemo_quant.sparsity.modules import sparse_layers
from nemo_quant.sparsity.patterns import magnitude_mask
from nemo_quant.utils.progress import progress

ForwardLoop = Callable[[nn.Module], None]


@dataclass
class SparsifyReport:
    method: str
    layers: int = 0
    seconds: float = 0.0
    layer_errors: dict[str, float] = field(default_factory=dict)  # relative output error per layer (data methods)


def sparsify(model: nn.Module, forward_loop: ForwardLoop | None = None) -> SparsifyReport:
    """Set every sparse layer's mask and weights; every rank must call it."""
    cfg: SparsityConfig | None = mode_config(model, "sparsity")
    if cfg is None:
        raise CalibrationError("sparsify() needs a model the sparsity mode was applied to "
                               "(apply_modes(model, [('sparsity', cfg)]) first).")
    method = SparsityMethod(cfg.method)
    report = SparsifyReport(method.value)
    start = time.perf_counter()
    if method == SparsityMethod.magnitude:
        for _, module in sparse_layers(model):
            _set(module, module.weight.detach(), magnitude_mask(module.weight.detach().float(), cfg.n, cfg.m))
            report.layers += 1
    else:
        if forward_loop is None:
            raise CalibrationError(f"sparsity.method={method.value} needs calibration data; pass a forward_loop to "
                                   "sparsify() (nemo-quant ptq/train pass the calibration windows).")
        _sequential(model, forward_loop, cfg, report)
    report.seconds = time.perf_counter() - start
    return report


def _set(module: nn.Module, weight: torch.Tensor, mask: torch.Tensor) -> None:
    with torch.no_grad():
        module.sparse_mask.copy_(mask)
        module.weight.copy_((weight * mask).to(module.weight.dtype))


def _solve(name: str, module: nn.Module, hessian: torch.Tensor, cfg: SparsityConfig) -> float:
    """Prune one layer on its whole weight; returns E(W) / E(0), its relative output error."""
    view = LinearView(name, module)
    w0 = view.weight
    if SparsityMethod(cfg.method) == SparsityMethod.sparsegpt:
        w, mask = solvers.sparsegpt(w0, hessian, cfg.n, cfg.m, cfg.damp, cfg.block_size)
    else:
        w, mask = solvers.admm(w0, hessian, cfg.n, cfg.m, cfg.damp, cfg.block_size, cfg.admm)
    _set(module, view.local_share(w), view.local_share(mask))
    dense = solvers.layer_error(torch.zeros_like(w0), w0, hessian)
    return solvers.layer_error(w, w0, hessian) / dense if dense > 0 else 0.0


def _observe_and_solve(model, layers, run_pass, cfg, report, bar) -> None:
    with observing(layers, Needs(hessian=True)) as observers:
        run_pass()
    for name, module in layers:
        obs = observers.pop(name)
        obs.merge_data_parallel()
        report.layer_errors[name] = _solve(name, module, obs.hessian, cfg)
        report.layers += 1
        bar.update(1)


def _sequential(model: nn.Module, forward_loop: ForwardLoop, cfg: SparsityConfig, report: SparsifyReport) -> None:
    from megatron.core import parallel_state as ps

    from nemo_quant.quantization.modules import global_name

    decoder_layers = list(model.decoder.layers) if getattr(model, "decoder", None) is not None else []
    targets = sparse_layers(model)
    by_layer: list[list[tuple[str, nn.Module]]] = [[] for _ in decoder_layers]
    outside = []
    for local, module in targets:
        parts = local.split(".")
        if parts[:2] == ["decoder", "layers"]:
            by_layer[int(parts[2])].append((global_name(model, local), module))
        else:
            outside.append((global_name(model, local), module))
    bar = progress(total=len(targets), desc=f"sparsify {cfg.n}:{cfg.m} ({SparsityMethod(cfg.method).value})",
                   unit="layer")
    stage, stages = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
    for s in range(stages):  # stage s records its inputs after stages < s are pruned
        calls = record_stage_inputs(model, forward_loop, skip_layers=stage >= s) if decoder_layers else []
        if stage != s:
            continue
        last = max((i for i, linears in enumerate(by_layer) if linears), default=-1)
        for i, (layer, linears) in enumerate(zip(decoder_layers[:last + 1], by_layer)):
            if linears:
                _observe_and_solve(model, linears, lambda: replay(model, layer, calls), cfg, report, bar)
            if i < last:  # later stages record their own inputs through the real forward
                calls = replay(model, layer, calls)
        calls = []
    if max_over_world(len(outside)):
        _observe_and_solve(model, outside, lambda: run_forward_loop_everywhere(model, forward_loop), cfg, report, bar)
    bar.close()
    if is_main_rank() and report.layer_errors:
        worst = max(report.layer_errors, key=report.layer_errors.get)
        print(f"[nemo_quant] sparsify: {report.layers} layers on this stage; relative output error up to "
              f"{report.layer_errors[worst]:.4f} ({worst})", flush=True)
