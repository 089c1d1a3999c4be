"""CPU shims for megatron-core.

megatron-core hard-codes a few CUDA calls on paths that work fine on CPU otherwise
(RoPE frequency tables, TP gather buffers, pipeline p2p shape exchange, token counters in
the pipeline schedules, the CUDA RNG tracker). When CUDA is absent those calls would raise,
so we redirect them to the CPU. Nothing is patched when CUDA is available: GPU behaviour
stays exactly Megatron's.
"""
from __future__ import annotations

import functools
import types

import torch

_APPLIED = False


def _cpu_current_device() -> str:
    # Callers use the value only as `device=...`; "cpu" is a valid device there.
    return "cpu"


def _map_cuda_device(device):
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _device_mapping(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _map_cuda_device(kwargs["device"])
        kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return wrapper


def _torch_namespace_without_cuda_tensors() -> types.SimpleNamespace:
    """A `torch` look-alike whose factories map device="cuda" to the CPU.

    Installed only as the `torch` global of the Megatron modules that allocate with a
    literal "cuda" device (pipeline schedules), so no other code is affected.
    """
    ns = types.SimpleNamespace()
    for name in dir(torch):
        if not name.startswith("__"):
            setattr(ns, name, getattr(torch, name))
    for factory in ("zeros", "ones", "empty", "tensor", "full", "arange"):
        setattr(ns, factory, _device_mapping(getattr(torch, factory)))
    return ns


def apply_cpu_shims() -> bool:
    """Install the shims if CUDA is absent. Returns True when shims are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None

    from megatron.core.pipeline_parallel import schedules

    schedules.torch = _torch_namespace_without_cuda_tensors()
    _APPLIED = True
    return True


def shims_active() -> bool:
    return _APPLIED
