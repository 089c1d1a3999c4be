"""The C++ CPU kernels (`cpu/fake_quant.cpp`): just-in-time build and the CPU backend.

The build runs once per machine and source version (torch caches it under
~/.cache/torch_extensions, or TORCH_EXTENSIONS_DIR) and needs g++ and ninja. FMA
contraction is off: the kernels must round exactly like the torch reference.
"""
from __future__ import annotations

import functools
import hashlib
import platform
from pathlib import Path

import torch

from nemo_quant.kernels.backend import KernelBackend, ScaleLayout
from nemo_quant.numerics.nf4 import NF4_CODEBOOK, NF4_MIDPOINTS

SOURCE = Path(__file__).parent / "cpu" / "fake_quant.cpp"
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fopenmp"]


def cpu_tag() -> str:
    """A short hash of the CPU's instruction-set flags: builds use -march=native, and a home
    directory shared by a cluster's nodes must not hand one node's build to another CPU."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.machine() + platform.processor()
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


@functools.cache
def load_ops():
    """torch.ops.nemo_quant_cpu, built on first use; raises if it cannot be built."""
    from torch.utils.cpp_extension import load

    load(f"nemo_quant_cpu_{cpu_tag()}", [str(SOURCE)], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
         is_python_module=False, verbose=False)
    return torch.ops.nemo_quant_cpu


class CpuKernels(KernelBackend):
    name = "cpu"
    description = "C++ kernels (kernels/cpu/fake_quant.cpp)"

    def __init__(self):
        self.ops = load_ops()

    def supports(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and super().supports(x)

    def int_(self, x, layout: ScaleLayout, bits):
        return self.ops.fake_quant_int(x, layout.amax, bits, layout.block)

    def fp8(self, x, layout: ScaleLayout, fmt_id):
        return self.ops.fake_quant_fp8(x, layout.amax, fmt_id, layout.block)

    def nvfp4(self, x, amax, block):
        return self.ops.fake_quant_nvfp4(x, amax, block)

    def mx(self, x, fmt_id, block):
        return self.ops.fake_quant_mx(x, fmt_id, block)

    def nf4(self, x, absmax_dq, block):
        return self.ops.fake_quant_nf4(x, absmax_dq, NF4_CODEBOOK, NF4_MIDPOINTS, block)

    def nf4_dequantize(self, packed, absmax, block, dtype):
        return self.ops.nf4_dequantize(packed, absmax.float().contiguous(), NF4_CODEBOOK, block, dtype)

    def absmax(self, x, block):
        return self.ops.absmax(x, block)
