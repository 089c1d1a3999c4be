"""What NeMo 2.7.3 needs to train on a CPU-only machine beside megatron-core 0.16.1 (measured in
../shared/DESIGN.md, "Integrations on CPU"). Test harness only: on GPUs none of this applies."""
from __future__ import annotations

import sys
import types

import torch


class _NoStream:
    """torch.cuda.Stream / torch.cuda.stream stand-ins: NeMo wraps module setup in a side stream."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args):
        pass


def _cpu(device):
    if isinstance(device, (str, torch.device)) and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaIsCpu(torch.overrides.TorchFunctionMode):
    """NeMo's step path and megatron's optimizer hard-code `device="cuda"`, `.cuda()`,
    `.to("cuda")` and `pin_memory`: on a CPU-only machine they all mean the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        kwargs.pop("pin_memory", None)
        if func is torch.Tensor.to:
            args = tuple(_cpu(a) for a in args)
        return func(*args, **kwargs)


def apply() -> None:
    from nemo_quant.runtime.cpu_shims import apply_cpu_shims

    apply_cpu_shims()  # torch.cuda.current_device and friends, as for our own jobs
    _CudaIsCpu().__enter__()  # for the rest of the process
    torch.cuda.Stream = _NoStream
    torch.cuda.stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    # megatron-core 0.16 dropped the tensorstore strategy that NeMo 2.7.3's checkpoint IO imports
    # (only to load with it, which CPU jobs never ask for).
    import megatron.core.dist_checkpointing.strategies as strategies

    if not hasattr(strategies, "tensorstore"):
        stub = types.ModuleType("megatron.core.dist_checkpointing.strategies.tensorstore")

        class TensorStoreLoadShardedStrategy:
            def __init__(self, *args, **kwargs):
                raise NotImplementedError("tensorstore loading is not available with megatron-core 0.16")

        stub.TensorStoreLoadShardedStrategy = TensorStoreLoadShardedStrategy
        sys.modules[stub.__name__] = stub
        strategies.tensorstore = stub
    _optimizer_arguments_of_megatron_016()
    _no_op_rng_tracker()
    import nemo.lightning.io.pl as nemo_io

    nemo_io._fix_tensors_device = lambda checkpoint: checkpoint  # asserts CUDA; CPU tensors need no move


def _no_op_rng_tracker() -> None:
    """Without CUDA NeMo seeds no model-parallel CUDA RNG state, and attention's dropout fork then
    fails; Megatron's inference tracker forks as a no-op (our own CPU jobs use it too)."""
    from megatron.core.tensor_parallel import random

    original = random.initialize_rng_tracker

    def initialize_rng_tracker(use_te_rng_tracker=False, inference_rng_tracker=False, use_cudagraphable_rng=False,
                               force_reset=False):
        return original(inference_rng_tracker=True, force_reset=force_reset)

    random.initialize_rng_tracker = initialize_rng_tracker
    original(inference_rng_tracker=True, force_reset=True)


def _optimizer_arguments_of_megatron_016() -> None:
    """NeMo 2.7.3 passes no_weight_decay_cond / scale_lr_cond / lr_mult, which megatron-core 0.16's
    get_megatron_optimizer no longer takes (its defaults: no decay on biases and norms, one lr)."""
    import inspect

    import megatron.core.optimizer as optimizer  # NeMo imports the name from here at each call

    original = optimizer.get_megatron_optimizer
    accepted = inspect.signature(original).parameters
    if "no_weight_decay_cond" in accepted:
        return

    def get_megatron_optimizer(config, model_chunks, **kwargs):
        dropped = {k: kwargs.pop(k) for k in ("no_weight_decay_cond", "scale_lr_cond", "lr_mult") if k in kwargs}
        if dropped.get("no_weight_decay_cond") or dropped.get("scale_lr_cond") or dropped.get("lr_mult", 1.0) != 1.0:
            raise NotImplementedError(f"megatron-core 0.16 has no {sorted(dropped)}; this CPU harness passes none")
        return original(config, model_chunks, **kwargs)

    optimizer.get_megatron_optimizer = get_megatron_optimizer
