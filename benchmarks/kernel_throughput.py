"""Fake-quant kernel throughput (BENCHMARKS.md "Speed figures").

    .venv/bin/python benchmarks/kernel_throughput.py [--sizes-mb 16 64 256] [--dtypes float32 bfloat16] [--repeats 5]

CPU: the C++ kernels vs the pure-torch reference (the naive composition of torch ops the
quantizer ran before), same tensor, same process, alternating; target >= 2x for every format.
GPU (when CUDA is present): the Triton kernels' bytes moved per second (read + write) vs a
device-to-device copy of the same tensor measured in the same run; target >= 80% of it.
Each kernel's output is checked equal to the reference's before it is timed.
Writes benchmarks/results/kernels.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from nemo_quant.kernels.backend import KernelBackend
from nemo_quant.quantization.config import QuantizerSpec
from nemo_quant.quantization.fake_quant import reference_fake_quant
from nemo_quant.quantization.tensor_quantizer import TensorQuantizer

RESULTS = Path(__file__).parent / "results"
COLS = 4096  # a hidden size: tensors are [rows, 4096]
CASES = {  # label -> (format, granularity, block); "absmax" is the calibration reduction
    "int8 per-tensor": ("int8", "tensor", 0),
    "int8 per-channel": ("int8", "channel", 0),
    "int4 block128": ("int4", "block", 128),
    "fp8 e4m3 per-tensor": ("fp8_e4m3", "tensor", 0),
    "fp8 e4m3 per-channel": ("fp8_e4m3", "channel", 0),
    "nvfp4": ("nvfp4", "block", 16),
    "mxfp8": ("mxfp8", "block", 32),
    "mxfp4": ("mxfp4", "block", 32),
    "nf4": ("nf4", "block", 64),
    "absmax per-tensor": None,
}


def _amax(x: torch.Tensor, spec: QuantizerSpec) -> torch.Tensor:
    """The amax max calibration gives this tensor, treated as a weight."""
    return TensorQuantizer(spec, "weight", tuple(x.shape)).reduce_amax(x).float()


def _timed(fn, repeats: int, sync) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _calls(kernels: KernelBackend, x: torch.Tensor, case):
    if case is None:
        return (lambda: kernels.absmax(x, 0)), (lambda: x.abs().amax()), 1
    spec = QuantizerSpec(format=case[0], granularity=case[1], block_size=case[2])
    amax = _amax(x, spec).to(x.device)
    got, want = kernels.fake_quant(x, spec, amax), reference_fake_quant(x, spec, amax)
    assert torch.equal(got, want), f"{case}: kernel output differs from the reference"
    return (lambda: kernels.fake_quant(x, spec, amax)), (lambda: reference_fake_quant(x, spec, amax)), 2


def bench_cpu(sizes_mb, dtypes, repeats) -> list[dict]:
    from nemo_quant.kernels.cpu_ops import CpuKernels

    kernels, rows = CpuKernels(), []
    for dtype in dtypes:
        for mb in sizes_mb:
            x = torch.randn(mb * 2**20 // (dtype.itemsize * COLS), COLS).to(dtype)
            for label, case in CASES.items():
                fast, naive, passes = _calls(kernels, x, case)
                t_fast, t_naive = _timed(fast, repeats, lambda: None), _timed(naive, repeats, lambda: None)
                moved = passes * x.numel() * dtype.itemsize / 1e6
                rows.append({"device": "cpu", "dtype": str(dtype).removeprefix("torch."), "size_mb": mb, "case": label,
                             "kernel_mb_s": moved / t_fast, "naive_mb_s": moved / t_naive, "speedup": t_naive / t_fast})
                print(f"cpu {rows[-1]['dtype']:8s} {mb:4d} MB {label:22s} kernel {rows[-1]['kernel_mb_s']:8.0f} MB/s  "
                      f"naive {rows[-1]['naive_mb_s']:7.0f} MB/s  x{rows[-1]['speedup']:.2f}", flush=True)
    return rows


def bench_cuda(sizes_mb, dtypes, repeats) -> list[dict]:
    from nemo_quant.kernels.triton_ops import TritonKernels

    kernels, rows, sync = TritonKernels(), [], torch.cuda.synchronize
    for dtype in dtypes:
        for mb in sizes_mb:
            x = torch.randn(mb * 2**20 // (dtype.itemsize * COLS), COLS, device="cuda").to(dtype)
            y = torch.empty_like(x)
            copy_gb_s = 2 * x.numel() * dtype.itemsize / 1e9 / _timed(lambda: y.copy_(x), repeats, sync)
            for label, case in CASES.items():
                fast, naive, passes = _calls(kernels, x, case)
                moved = passes * x.numel() * dtype.itemsize / 1e9
                t_fast, t_naive = _timed(fast, repeats, sync), _timed(naive, repeats, sync)
                rows.append({"device": torch.cuda.get_device_name(), "dtype": str(dtype).removeprefix("torch."), "size_mb": mb,
                             "case": label, "kernel_gb_s": moved / t_fast, "naive_gb_s": moved / t_naive,
                             "copy_gb_s": copy_gb_s, "of_copy": moved / t_fast / copy_gb_s})
                print(f"cuda {rows[-1]['dtype']:8s} {mb:4d} MB {label:22s} {rows[-1]['kernel_gb_s']:7.0f} GB/s "
                      f"= {rows[-1]['of_copy']:.0%} of copy ({copy_gb_s:.0f} GB/s); naive {rows[-1]['naive_gb_s']:.0f} GB/s", flush=True)
    return rows


def markdown(cpu: list[dict], cuda: list[dict], threads: int) -> str:
    lines = ["# Fake-quant kernel throughput", "",
             f"CPU: {platform.processor() or platform.machine()}, {threads} torch threads. MB/s = bytes read + written "
             "(absmax: read) per second; naive = the pure-torch reference. Target: >= 2x.", "",
             "| dtype | MB | case | kernel MB/s | naive MB/s | speedup | >= 2x |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['size_mb']} | {r['case']} | {r['kernel_mb_s']:.0f} | {r['naive_mb_s']:.0f} | "
              f"{r['speedup']:.2f} | {'yes' if r['speedup'] >= 2 else 'NO'} |" for r in cpu]
    if cuda:
        lines += ["", f"GPU: {cuda[0]['device']}. Target: >= 80% of a device-to-device copy's bytes/s.", "",
                  "| dtype | MB | case | kernel GB/s | copy GB/s | of copy | naive GB/s | >= 80% |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['size_mb']} | {r['case']} | {r['kernel_gb_s']:.0f} | {r['copy_gb_s']:.0f} | "
                  f"{r['of_copy']:.0%} | {r['naive_gb_s']:.0f} | {'yes' if r['of_copy'] >= 0.8 else 'NO'} |" for r in cuda]
    else:
        lines += ["", "GPU: not measured (no CUDA device in this run)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-cpu", action="store_true", help="GPU figures only")
    args = parser.parse_args()
    dtypes = [getattr(torch, d) for d in args.dtypes]
    cpu = [] if args.skip_cpu else bench_cpu(args.sizes_mb, dtypes, args.repeats)
    cuda = bench_cuda(args.sizes_mb, dtypes, args.repeats) if torch.cuda.is_available() else []
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernels.json").write_text(json.dumps({"cpu": cpu, "cuda": cuda, "threads": torch.get_num_threads()}, indent=1))
    (RESULTS / "kernels.md").write_text(markdown(cpu, cuda, torch.get_num_threads()))
    print(f"wrote {RESULTS / 'kernels.md'}")


if __name__ == "__main__":
    main()
