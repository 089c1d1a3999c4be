"""The `qlora` mode: a frozen base (NF4 or as loaded) and LoRA adapters on the targeted linears.

Only the adapters train: every other parameter of the model is frozen by `apply`. The mode's
state (its config) is replayed before a checkpoint loads, which rebuilds the NF4 buffers'
shapes and the adapters, then fills them with the saved bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.mode_patterns import hits_on_all_ranks, linears_with_hits
from nemo_quant.modes import Mode, register_mode
from nemo_quant.qlora.config import AdapterDType, AdapterInit, BaseFormat, QLoRAConfig
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.utils.memory import release_freed_memory


def validate_qlora_config(cfg: QLoRAConfig) -> None:
    BaseFormat(cfg.base_format), AdapterInit(cfg.init), AdapterDType(cfg.adapter_dtype)
    if cfg.rank < 1:
        raise ConfigError(f"qlora.rank={cfg.rank}: must be >= 1 (16 is the usual choice).")
    if cfg.alpha <= 0:
        raise ConfigError(f"qlora.alpha={cfg.alpha}: must be positive (usually 2 x qlora.rank).")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"qlora.dropout={cfg.dropout}: must be in [0, 1).")
    if not cfg.targets:
        raise ConfigError("qlora.targets is empty; give fnmatch patterns such as ['decoder.layers.*'].")
    if AdapterInit(cfg.init) == AdapterInit.loftq and BaseFormat(cfg.base_format) == BaseFormat.none:
        raise ConfigError("qlora.init=loftq fits the adapters to the NF4 quantization error, and "
                          "qlora.base_format=none has none; use qlora.init=standard.")


@dataclass
class QLoRAPlan:
    layers: list[tuple[str, nn.Module, int]] = field(default_factory=list)  # (global name, module, weight TP axis)
    target_hits: list[int] = field(default_factory=list)


def plan_qlora(model: nn.Module, cfg: QLoRAConfig) -> QLoRAPlan:
    """The layers the mode converts, with the checks that refuse one (run before any work)."""
    from nemo_quant.qlora.modules import LoRALinearMixin

    plan = QLoRAPlan(target_hits=[0] * len(cfg.targets))
    for name, module, axis, hits in linears_with_hits(model, cfg.targets, LoRALinearMixin):
        for i in hits:
            plan.target_hits[i] += 1
        if not hits:
            continue
        if name == "output_layer":
            raise ConfigError(f"qlora.targets[{hits[0]}]={cfg.targets[hits[0]]!r} matches output_layer: adapters on "
                              "the vocabulary-parallel output layer are not supported; target decoder layers "
                              "('decoder.layers.*').")
        _check_layer(name, module, axis, cfg)
        plan.layers.append((name, module, axis))
    return plan


def _check_layer(name: str, module: nn.Module, axis: int, cfg: QLoRAConfig) -> None:
    from nemo_quant.qlora.nf4_base import check_nf4_layer

    if getattr(module, "sequence_parallel", False):
        raise ConfigError(f"{name}: sequence parallelism is not supported by qlora; set sequence_parallel off.")
    if hasattr(module, "weight_quantizer"):
        raise ConfigError(f"{name} is fake-quantized (quant=...) and qlora would put an NF4 base and adapters on the "
                          "same weight; train with qlora alone, export export.format=merged, then quantize the merge.")
    smallest = min(module.input_size, *_part_rows(name, module))
    if cfg.rank > smallest:
        raise ConfigError(f"qlora.rank={cfg.rank} exceeds a dimension of {name} ({smallest}); choose a smaller rank.")
    if BaseFormat(cfg.base_format) == BaseFormat.nf4:
        check_nf4_layer(name, module, axis == 1)


def _part_rows(name: str, module: nn.Module) -> list[int]:
    """Output rows of each Hugging Face tensor the layer fuses (q, k, v have their own sizes)."""
    import torch

    from nemo_quant.models.arch import arch_of_config
    from nemo_quant.qlora.hf_parts import split_parts

    rows = torch.empty(module.output_size, 1)
    return [p.shape[0] for p in split_parts(rows, name, arch_of_config(module.config), name.endswith("linear_fc1"))]


def _check(model: nn.Module, cfg: QLoRAConfig) -> None:
    """Every rank plans its own stage; target hit counts are summed over all ranks (patterns may
    match another stage's layers only) even when this rank's plan failed, so no rank waits."""
    counts = hits_on_all_ranks(lambda: plan_qlora(model, cfg).target_hits, len(cfg.targets))
    for i, pattern in enumerate(cfg.targets):
        if counts[i] == 0:
            raise ConfigError(f"qlora.targets[{i}]={pattern!r} matches no linear layer; module names look like "
                              "'decoder.layers.0.self_attention.linear_qkv' (fnmatch syntax).")


def _apply(model: nn.Module, cfg: QLoRAConfig) -> int:
    from nemo_quant.qlora.modules import convert_to_lora
    from nemo_quant.utils.progress import progress

    plan = plan_qlora(model, cfg)
    bar = progress(len(plan.layers), "qlora", unit="layer")
    for name, module, axis in plan.layers:
        convert_to_lora(name, module, cfg, axis)
        bar.update(1)
    bar.close()
    for pname, p in model.named_parameters():
        p.requires_grad_(pname.endswith(("lora_A", "lora_B")))
    release_freed_memory()  # the freed 16/32-bit weights leave the resident set
    if is_main_rank():
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"[nemo_quant] qlora ({BaseFormat(cfg.base_format).value} base, r={cfg.rank}, alpha={cfg.alpha}): "
              f"{len(plan.layers)} linear layers on rank 0's stage, {trainable:,} trainable parameters there",
              flush=True)
    return len(plan.layers)


QLORA = register_mode(Mode(
    name="qlora",
    config_class=QLoRAConfig,
    apply=_apply,
    may_follow=frozenset({"prune"}),
    validate=validate_qlora_config,
    check=_check,
))
