"""nemo_quant modes in a NeMo 2 job (`nemo.collections.llm.train` / `finetune`):

    from nemo_quant.integrations.nemo import NemoQuantTransform
    llm.train(model, data, trainer, optim=optim, model_transform=NemoQuantTransform(quant="fp8"))

NeMo applies a model transform once, at the first training (or validation) epoch start: after
the Megatron model is built, wrapped in Megatron's DDP and given its optimizer. The sparsity and
quantize modes swap module classes in place, so the parameters, their DDP gradient hooks and the
optimizer's references stay those of the original model, and training goes on through the 2:4
masks (pruned weights get zero gradients) and the fake quantizers; each mode's data step (masks,
then scales) runs on the first `calib_batches` training batches.
The mode state travels in NeMo's checkpoint (`nemo_quant_modes`); the quantizer scales are
buffers of the sharded model state.

QLoRA adds parameters, so it comes as a NeMo PEFT (`NemoQuantQLoRA`): NeMo then builds DDP and the
optimizer after the transform, over the adapters only, and saves adapter checkpoints.

    llm.finetune(model, data, trainer, peft=NemoQuantQLoRA("nf4"))
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable

import torch
from nemo.lightning.pytorch.callbacks.model_transform import ModelTransform
from nemo.lightning.pytorch.callbacks.peft import PEFT
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nemo_quant.config.compose import compose_app_config
from nemo_quant.config.validate import ConfigError
from nemo_quant.integrations.lightning import CHECKPOINT_KEY, default_batch_tokens, megatron_gpt_models
from nemo_quant.modes import apply_mode, apply_modes, get_mode, mode_state
from nemo_quant.preflight import preflight
from nemo_quant.runtime.pipeline import position_ids_for


def preset(group: str, name: str | dict | DictConfig) -> dict:
    """A preset of conf/<group>/ (or an inline config) as a plain dict."""
    if isinstance(name, DictConfig):
        return OmegaConf.to_container(name, resolve=True)
    if isinstance(name, dict):
        return name
    return OmegaConf.to_container(compose_app_config([f"{group}={name}"])[group], resolve=True)


class NemoQuantTransform(ModelTransform):
    """`model_transform=` for llm.train / llm.finetune: 2:4 sparsity and / or quantization (QAT, or
    QAD with NeMo's distillation) applied in place, their masks and scales chosen on the job's own
    training batches. `quant` / `sparsity`: a preset name of conf/quant/ / conf/sparsity/ or a config."""

    def __init__(self, quant: str | dict | DictConfig | None = None, calib_batches: int = 16,
                 batch_tokens: Callable[[Any], torch.Tensor] = default_batch_tokens,
                 sparsity: str | dict | DictConfig | None = None):
        super().__init__()
        if calib_batches < 1:
            raise ConfigError(f"NemoQuantTransform(calib_batches={calib_batches}): must be at least 1.")
        if quant is None and sparsity is None:
            raise ConfigError("NemoQuantTransform needs quant=<preset> and/or sparsity=<preset>.")
        self.modes = [(name, preset(group, cfg)) for name, group, cfg in
                      (("sparsity", "sparsity", sparsity), ("quantize", "quant", quant)) if cfg is not None]
        self.calib_batches = calib_batches
        self.batch_tokens = batch_tokens
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer
        super().setup(trainer, pl_module, stage)

    def __call__(self, model: nn.Module) -> nn.Module:
        resumed = self._trainer.ckpt_path if self._trainer is not None else None
        for gpt in megatron_gpt_models(model):
            if mode_state(gpt):
                continue  # already transformed (a second fit on the same module)
            preflight(gpt, None, self.modes)
            for name, cfg in self.modes:
                apply_mode(gpt, name, cfg)
                if not resumed:
                    get_mode(name).data_step(gpt, self._calibration_loop)
            if resumed:
                self._check_saved_modes(gpt)
                load_mode_buffers(gpt, resumed)
        return model

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # NeMo restores the checkpoint before the transform runs; what it saved is checked then.
        self._saved_modes = checkpoint.get(CHECKPOINT_KEY)

    def _check_saved_modes(self, gpt: nn.Module) -> None:
        saved = getattr(self, "_saved_modes", None)
        if saved is None:
            raise ConfigError("resuming from a NeMo checkpoint without nemo_quant's mode state: it was not "
                              "written with NemoQuantTransform; start a new run (no resume) to quantize it.")
        if saved != mode_state(gpt):
            described = lambda state: [f"{m['name']}={m['config'].get('name')}" for m in state]  # noqa: E731
            raise ConfigError(f"the checkpoint was trained with {described(saved)}, this job asks for "
                              f"{described(mode_state(gpt))}; resume with the same modes.")

    def _calibration_loop(self, gpt: nn.Module) -> None:
        if self._trainer is None:
            raise RuntimeError("NemoQuantTransform runs as llm.train's model_transform (it reads the training data).")
        loader = self._trainer.datamodule.train_dataloader() if self._trainer.datamodule else self._trainer.train_dataloader
        for batch in islice(iter(loader), self.calib_batches):
            tokens = self.batch_tokens(batch)
            mask = batch.get("attention_mask") if isinstance(batch, dict) else None
            gpt(tokens, position_ids_for(tokens), mask)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        states = [mode_state(m) for m in megatron_gpt_models(trainer.model)]
        if states[0]:
            checkpoint[CHECKPOINT_KEY] = states[0]



class NemoQuantQLoRA(PEFT):
    """`peft=` for llm.finetune (or `model_transform=` for llm.train): nemo_quant's QLoRA, the base
    frozen as bitsandbytes-exact NF4 with double quantization and LoRA adapters trained on top, at
    any TP. NeMo wraps DDP and builds the optimizer after it, over the adapters."""

    def __init__(self, qlora: str | dict | DictConfig = "nf4"):
        super().__init__()
        self.modes = [("qlora", preset("qlora", qlora))]

    def transform(self, module, name=None, prefix=None):
        return module  # the mode converts the whole model at once (__call__)

    def __call__(self, model: nn.Module) -> nn.Module:
        for gpt in megatron_gpt_models(model):
            if not mode_state(gpt):
                preflight(gpt, None, self.modes)
                apply_modes(gpt, self.modes)  # freezes everything but the adapters
        return model


def load_mode_buffers(gpt: nn.Module, checkpoint: str) -> None:
    """The buffers of a NeMo checkpoint (its Megatron dist checkpoint under weights/) into `gpt`,
    whose modes are applied: a resumed run keeps the sparsity masks and quantizer scales it trained
    with (NeMo restored the parameters before the modes existed)."""
    from pathlib import Path

    from megatron.core import dist_checkpointing

    # NeMo saves the model under the "module." prefix of its MegatronParallel wrapper.
    buffers = {f"module.{name}" for name, _ in gpt.named_buffers()}
    sharded = {k: v for k, v in gpt.sharded_state_dict(prefix="module.").items() if k in buffers}
    weights = Path(checkpoint) / "weights" if (Path(checkpoint) / "weights").is_dir() else Path(checkpoint)
    loaded = dist_checkpointing.load(sharded, str(weights))
    # through load_state_dict, so each quantizer marks itself calibrated as on any checkpoint load
    result = gpt.load_state_dict({k.removeprefix("module."): v for k, v in loaded.items()}, strict=False)
    missing = [k for k in result.missing_keys if f"module.{k}" in buffers]
    if missing:
        raise RuntimeError(f"{checkpoint} lacks mode state {missing[:3]}")
