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

# Megatron modules that allocate with a literal device="cuda".
_MODULES_ALLOCATING_ON_CUDA = (
    "megatron.core.pipeline_parallel.schedules",  # token counters
    "megatron.core.transformer.utils",  # default causal mask
)


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
    literal "cuda" device, so no other code is affected.
    """
    ns = types.SimpleNamespace()
    for name in dir(torch):
        if not name.startswith("__"):
            setattr(ns, name, getattr(torch, name))
    for factory in ("zeros", "ones", "empty", "tensor", "full", "arange"):
        setattr(ns, factory, _device_mapping(getattr(torch, factory)))
    return ns


def _tensor_cuda_is_identity(fn):
    """Run `fn` with `Tensor.cuda()` returning the tensor itself, for this call only."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        original = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.cuda = original

    return wrapper


def apply_cpu_shims() -> bool:
    """Install the shims if CUDA is absent. Returns True when shims are active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    torch.cuda.current_device = _cpu_current_device
    torch.cuda.synchronize = lambda *args, **kwargs: None

    import importlib

    cpu_torch = _torch_namespace_without_cuda_tensors()
    for module_name in _MODULES_ALLOCATING_ON_CUDA:
        importlib.import_module(module_name).torch = cpu_torch

    # Tied embeddings under PP: the last stage's copy is moved with `.cuda()` before the
    # first/last-stage all-reduce.
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _tensor_cuda_is_identity(
        LanguageModule.setup_embeddings_and_output_layer
    )
    _APPLIED = True
    return True


def shims_active() -> bool:
    return _APPLIED
