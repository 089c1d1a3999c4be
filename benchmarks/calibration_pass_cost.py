"""What layout-invariant calibration costs: the statistics pass with canonical-shard GEMMs
(runtime/canonical_gemms.py) next to the plain Megatron GEMMs, same model, same windows.

SmolLM2-135M, calibration windows of Austen, logits skipped as in calibration. Two passes are
timed, interleaved (plain, canonical, plain, ...) so a busy machine slows both alike, best of
`--repeats`: the bare forward loop, and the AWQ statistics pass (observers recording what AWQ
needs: per-channel statistics, token samples, block Hessians). Works under torchrun at TP > 1.

    .venv/bin/python benchmarks/calibration_pass_cost.py [--windows 8] [--repeats 3]
    torchrun --nproc-per-node 3 benchmarks/calibration_pass_cost.py --tp 3
Writes benchmarks/results/calibration_pass_cost_tp{N}.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    from omegaconf import OmegaConf

    from nemo_quant.config.schema import DataConfig
    from nemo_quant.data.datasets import calibration_windows
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.algorithms.observe import Needs, bypassed_quantizers, observing
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.quantization.mixed_precision import load_preset
    from nemo_quant.quantization.modules import QuantLinearMixin
    from nemo_quant.runtime.canonical_gemms import canonical_gemms
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, is_main_rank

    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tp", type=int, default=1)
    args = parser.parse_args()

    init_megatron(ParallelLayout(args.tp, 1), timeout_s=600)
    loaded = load_model(None)
    data = OmegaConf.structured(DataConfig(calib_samples=args.windows))
    windows = calibration_windows(data, loaded.tokenizer)
    cfg = load_preset("int4_awq")
    apply_modes(loaded.model, [("quantize", cfg)])
    model = loaded.model.eval()
    loop = windows_forward_loop(windows)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLinearMixin)]
    needs = Needs(samples=True, block_hessian=True, token_stride=cfg.search.token_stride)

    def forward(canonical: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), bypassed_quantizers(model), (canonical_gemms(model) if canonical else nullcontext()):
            loop(model)
        return time.perf_counter() - start

    def statistics(canonical: bool) -> float:
        start = time.perf_counter()
        with torch.no_grad(), bypassed_quantizers(model), observing(layers, needs), \
                (canonical_gemms(model) if canonical else nullcontext()):
            loop(model)
        return time.perf_counter() - start

    best: dict[str, float] = {}
    os.environ["NEMO_QUANT_QUIET"] = "1"  # no progress lines inside the timed passes
    forward(False)  # warm-up
    for _ in range(args.repeats):
        for name, fn in (("forward", forward), ("statistics", statistics)):
            for canonical in (False, True):
                key = f"{name}_{'canonical' if canonical else 'plain'}_s"
                best[key] = min(best.get(key, float("inf")), fn(canonical))
    if not is_main_rank():
        return
    result = {"model": "smollm2-135m", "tp": args.tp, "windows": args.windows, "seq_length": int(windows.shape[1]),
              "threads": torch.get_num_threads(), "repeats": args.repeats, **best,
              "forward_overhead_pct": 100 * (best["forward_canonical_s"] / best["forward_plain_s"] - 1),
              "statistics_overhead_pct": 100 * (best["statistics_canonical_s"] / best["statistics_plain_s"] - 1)}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"calibration_pass_cost_tp{args.tp}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = ["| pass | plain GEMMs s | canonical shards s | overhead |", "|---|---|---|---|"]
    for name in ("forward", "statistics"):
        md.append(f"| {name} | {best[f'{name}_plain_s']:.2f} | {best[f'{name}_canonical_s']:.2f} | "
                  f"{result[f'{name}_overhead_pct']:+.1f}% |")
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
