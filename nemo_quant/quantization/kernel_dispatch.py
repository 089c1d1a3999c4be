"""Which fake-quant implementation runs: chosen once per device type, and said so.

Policy (`quant.kernels`, else the NEMO_QUANT_KERNELS environment variable, else auto):
- auto: the kernels when they build/import (C++ on CPU, Triton on CUDA); otherwise the
  pure-torch reference, with one warning that says why and how to fix it.
- reference: the pure-torch reference everywhere (debugging, bisecting a numerics change).
- kernels: the kernels or an error (benchmarks, production jobs that must not run slow).
A layout no kernel takes (rare: an amax broadcast the kernels do not read) runs on the
reference, reported once per format and layout.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Optional

import torch

from nemo_quant.config.validate import ConfigError
from nemo_quant.utils.progress import quiet

log = logging.getLogger(__name__)

ENV_VAR = "NEMO_QUANT_KERNELS"
POLICIES = ("auto", "reference", "kernels")


class KernelUnavailableError(RuntimeError):
    pass


_policy: Optional[str] = None  # set by set_kernel_policy; None = the environment's
_selected: dict[str, object] = {}  # device type -> backend, or None for the reference
_reported: set[tuple] = set()


def check_policy(policy: str, key: str) -> str:
    if policy not in POLICIES:
        raise ConfigError(f"{key}={policy!r}: choose one of {', '.join(POLICIES)}.")
    return policy


def kernel_policy() -> str:
    if _policy is not None:
        return _policy
    return check_policy(os.environ.get(ENV_VAR, "auto").strip() or "auto", ENV_VAR)


def set_kernel_policy(policy: Optional[str], key: str = "quant.kernels") -> None:
    """Set the process-wide policy (None: back to the environment's); selections are redone."""
    global _policy
    _policy = None if policy is None else check_policy(policy, key)
    _selected.clear()


def _cpu_backend():
    from nemo_quant.kernels.cpu_ops import CpuKernels

    return CpuKernels()


def _cuda_backend():
    from nemo_quant.kernels.triton_ops import TritonKernels

    return TritonKernels()


BUILDERS: dict[str, tuple[Callable[[], object], str]] = {
    "cpu": (_cpu_backend, "needs g++ and ninja (pip install ninja) for the just-in-time build"),
    "cuda": (_cuda_backend, "needs triton (shipped with CUDA builds of torch)"),
}


def _announce(message: str) -> None:
    log.info(message)
    if not quiet():
        print(f"[nemo_quant] {message}", flush=True)


def _select(device_type: str):
    policy = kernel_policy()
    if policy == "reference":
        _announce(f"fake quantization on {device_type}: pure-torch reference ({ENV_VAR}/quant.kernels=reference)")
        return None
    if device_type not in BUILDERS:
        if policy == "kernels":
            raise KernelUnavailableError(f"no fake-quant kernels for {device_type} tensors; set {ENV_VAR}=auto or quant.kernels=auto.")
        return None
    build, needs = BUILDERS[device_type]
    try:
        backend = build()
    except Exception as err:  # a build/import failure of any kind means "no kernels here"
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        if policy == "kernels":
            raise KernelUnavailableError(f"{device_type} fake-quant kernels unavailable ({reason}); it {needs}. "
                                         f"Set {ENV_VAR}=auto to run the pure-torch reference instead.") from err
        log.warning("fake quantization on %s: kernels unavailable (%s); it %s. Running the pure-torch reference "
                    "(set %s=reference to choose it explicitly).", device_type, reason, needs, ENV_VAR)
        return None
    _announce(f"fake quantization on {device_type}: {backend.description}")
    return backend


def backend_for(device: torch.device):
    """The kernel backend for tensors on `device`, or None for the reference."""
    key = device.type
    if key not in _selected:
        _selected[key] = _select(key)
    return _selected[key]


def report_reference_layout(fmt: str, x: torch.Tensor, amax: torch.Tensor) -> None:
    """Say once per format, dtype, rank and amax shape (not per batch shape) that a layout
    runs on the reference although kernels are selected."""
    key = (fmt, x.dtype, x.dim(), tuple(amax.shape))
    if key not in _reported:
        _reported.add(key)
        log.warning("fake quantization: no kernel for %s with %s, x%s, amax%s; this layout runs on the pure-torch "
                    "reference.", fmt, x.dtype, tuple(x.shape), tuple(amax.shape))
