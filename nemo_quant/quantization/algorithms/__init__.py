"""Calibration algorithms (quant.algorithm, quant.gptq): SmoothQuant, AWQ, GPTQ.

`run_algorithm` observes the unquantized model on the calibration data (one forward pass
per group of layers that fits quant.search.memory_gib), then, layer by layer: searches the
pre-quant scale (SmoothQuant / AWQ), folds it into the preceding norm or keeps it on the
layer, searches weight clipping (AWQ clip), runs GPTQ, and sets the scales it decided. The
remaining quantizers are calibrated by `calibrate` as usual afterwards.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from nemo_quant.distributed import max_over_world
from nemo_quant.quantization.algorithms.awq import awq_candidates, awq_clip
from nemo_quant.quantization.algorithms.fold import (
    fold_into_previous, fold_order, fold_problem, fold_target, tied_candidates,
)
from nemo_quant.quantization.algorithms.gptq import column_quantizer, gptq_quantize
from nemo_quant.quantization.algorithms.linear_view import LinearView, apply_pre_quant_scale
from nemo_quant.quantization.algorithms.observe import LinearObserver, Needs, bypassed_quantizers, observing
from nemo_quant.quantization.algorithms.scale_search import best_scale
from nemo_quant.quantization.algorithms.smoothquant import smoothquant_candidates
from nemo_quant.quantization.config import SMOOTHING, Algorithm, CalibratorName, Granularity, QFormat, QuantConfig
from nemo_quant.quantization.forward_loop import CalibrationError, run_forward_loop_everywhere
from nemo_quant.utils.progress import progress

CLIPPING = {Algorithm.awq_clip, Algorithm.awq_full}


def uses_algorithm(cfg: QuantConfig) -> bool:
    return Algorithm(cfg.algorithm) != Algorithm.max or cfg.gptq.enabled


def run_algorithm(model: nn.Module, cfg: QuantConfig, forward_loop: Callable[[nn.Module], None] | None) -> set[int]:
    """Apply `cfg`'s algorithm in place; returns the ids of the quantizers it calibrated."""
    from nemo_quant.quantization.modules import QuantLinearMixin

    algo = Algorithm(cfg.algorithm)
    if forward_loop is None:
        raise CalibrationError(f"quant.algorithm={algo.value} (or quant.gptq.enabled) needs calibration data; "
                               "pass a forward_loop to calibrate().")
    layers = [(n, m) for n, m in model.named_modules()
              if isinstance(m, QuantLinearMixin) and m.weight_quantizer is not None]
    for name, module in layers:
        pqs = getattr(module, "pre_quant_scale", None)
        if pqs is not None and not bool((pqs == 1).all()):
            raise CalibrationError(f"{name} already holds a pre-quant scale: SmoothQuant/AWQ run once, on a model "
                                   "fresh from apply_modes (restore a calibrated checkpoint instead of recalibrating).")
    fold = cfg.search.fold_all_scales and algo in SMOOTHING
    if fold:
        problems = [p for p in (fold_problem(model, n) for n, _ in layers) if p]
        if problems:
            raise CalibrationError(problems[0])
        layers = fold_order(layers)
    needs = Needs(samples=algo in SMOOTHING, block_hessian=algo in CLIPPING, hessian=cfg.gptq.enabled,
                  token_stride=cfg.search.token_stride)
    groups = _groups_within_budget(layers, needs, cfg.search.memory_gib)
    done: set[int] = set()
    for i in range(max_over_world(len(groups))):  # every rank runs every pass (PP stages relay)
        group = groups[i] if i < len(groups) else []
        with bypassed_quantizers(model), observing(group, needs) as observers:
            run_forward_loop_everywhere(model, forward_loop)
        bar = progress(total=len(group), desc=f"{algo.value}{' + gptq' if cfg.gptq.enabled else ''}", unit="layer")
        for name, module in group:
            obs = observers.pop(name)
            obs.merge_data_parallel()
            done |= _process_layer(model, name, module, obs, cfg)
            bar.update(1)
        bar.close()
    return done


def _process_layer(model: nn.Module, name: str, module: nn.Module, obs: LinearObserver, cfg: QuantConfig) -> set[int]:
    algo = Algorithm(cfg.algorithm)
    view = LinearView(name, module)
    scale = torch.ones_like(obs.absmax)
    target = fold_target(model, name) if cfg.search.fold_all_scales and algo in SMOOTHING else None
    candidates = []
    if algo == Algorithm.smoothquant:
        candidates = smoothquant_candidates(view, obs, cfg.search.scale_grid)
    elif algo in (Algorithm.awq_lite, Algorithm.awq_full):
        candidates = awq_candidates(view, obs, cfg.search.scale_grid)
    if candidates:
        _, scale = best_scale(view, obs, tied_candidates(target, candidates) if target else candidates)
    done: set[int] = set()
    amax = None
    if algo in CLIPPING:
        amax = awq_clip(view, obs, scale, cfg.search.clip_grid, cfg.search.clip_min)
    if algo in SMOOTHING:
        if target is not None:
            fold_into_previous(view, target, scale)
        else:
            apply_pre_quant_scale(model, view, scale)
        view.weight = view.weight / scale
        _set_input_amax_from_statistics(module, obs, scale, done)
    if cfg.gptq.enabled:
        if amax is None:
            amax = view.weight_amax(view.weight)
        quantize = column_quantizer(QFormat(view.wspec.format))
        keep = view.full_mask()  # a sparse layer's pruned weights stay 0 (joint SparseGPT + GPTQ)
        view.write_weight(gptq_quantize(view.weight, obs.hessian, view.amax_per_column(amax), quantize, cfg.gptq, scale,
                                        keep))
    if amax is not None:
        module.weight_quantizer.set_amax(view.local_weight_amax(amax))
        done.add(id(module.weight_quantizer))
    return done


def _set_input_amax_from_statistics(module: nn.Module, obs: LinearObserver, scale: torch.Tensor, done: set[int]) -> None:
    """A max-calibrated per-tensor input amax after smoothing is max_j(max|x_j| * s_j): known
    from the statistics pass already, no second pass over the data."""
    q = module.input_quantizer
    if q is None or not q.needs_calibration or CalibratorName(q.spec.calibrator) != CalibratorName.max:
        return
    if Granularity(q.spec.granularity) != Granularity.tensor or float(obs.count) == 0:
        return
    q.set_amax((obs.absmax * scale).max())
    done.add(id(q))


def _groups_within_budget(layers, needs: Needs, memory_gib: float) -> list[list]:
    if memory_gib <= 0:
        return [layers] if layers else []
    budget = memory_gib * 2**30
    groups, current, used = [], [], 0
    for name, module in layers:
        size = needs.bytes_for(module.input_size, est_samples=4096)
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append((name, module))
        used += size
    if current:
        groups.append(current)
    return groups
