"""Lightning callback: nemo_quant modes on the Megatron model inside a LightningModule.

    callbacks:
      - _target_: nemo_quant.integrations.lightning.NemoQuantCallback
        quant: ${quant}            # any preset from conf/quant/ (or qlora: one from conf/qlora/)
        calib_batches: 16
        export: ${export}          # optional: deployable checkpoint when fit ends (conf/export/)
        vocab_size: 49152          # the unpadded vocabulary, needed by export

At `setup` the callback finds the Megatron GPT model in the LightningModule and applies the
modes in place (so the optimizer, configured afterwards, sees the final modules). At
`on_train_start` it calibrates the quantizers that still lack scales on the first
`calib_batches` training batches; on resume they are already filled from the checkpoint.
The mode state travels in the Lightning checkpoint and is checked on load. With `export`,
`on_fit_end` writes the HF / TensorRT-LLM checkpoint (every rank takes part, rank 0 writes).
"""
from __future__ import annotations

from itertools import islice
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from nemo_quant.modes import apply_modes, mode_state
from nemo_quant.preflight import preflight
from nemo_quant.quantization.calibrate import calibrate
from nemo_quant.quantization.modules import quantizers
from nemo_quant.runtime.pipeline import position_ids_for

CHECKPOINT_KEY = "nemo_quant_modes"


def megatron_gpt_models(module: nn.Module) -> list[nn.Module]:
    """The megatron.core GPTModels inside a framework's module (a LightningModule, NeMo's wrappers)."""
    from megatron.core.models.gpt import GPTModel

    found = [m for m in module.modules() if isinstance(m, GPTModel)]
    if not found:
        raise TypeError(f"{type(module).__name__} holds no megatron.core GPTModel; nemo_quant's modes "
                        f"(NemoQuantCallback, NemoQuantTransform, `+nemo_quant=...` in a Hydra job) act on one.")
    return found


def find_megatron_model(module: nn.Module) -> nn.Module:
    return megatron_gpt_models(module)[0]


def default_batch_tokens(batch: Any) -> torch.Tensor:
    """Token ids from a batch: a tensor, a (tokens, ...) tuple or a dict with 'tokens'/'input_ids'."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("tokens", "input_ids"):
            if key in batch:
                return batch[key]
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError("cannot find token ids in the batch; pass batch_tokens=<callable> to NemoQuantCallback.")


class NemoQuantCallback(pl.Callback):
    def __init__(self, quant: dict | DictConfig | None = None, calib_batches: int = 16,
                 batch_tokens: Callable[[Any], torch.Tensor] = default_batch_tokens,
                 export: dict | DictConfig | None = None, vocab_size: int | None = None,
                 qlora: dict | DictConfig | None = None):
        if calib_batches < 1:
            raise ValueError(f"calib_batches={calib_batches}: must be at least 1.")
        self.export = None
        if export is not None:
            from nemo_quant.export.config import as_export_config

            if vocab_size is None:
                raise ValueError("NemoQuantCallback(export=...) needs vocab_size=<unpadded vocabulary size>.")
            self.export = as_export_config(export)  # unknown keys fail here, before training
            if self.export.path is None:
                raise ValueError("NemoQuantCallback: export.path is not set.")
        self.vocab_size = vocab_size
        self.modes = [(name, OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg)
                      for name, cfg in (("quantize", quant), ("qlora", qlora)) if cfg]
        self.calib_batches = calib_batches
        self.batch_tokens = batch_tokens
        self._model: nn.Module | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        model = find_megatron_model(pl_module)
        modes = [] if mode_state(model) else self.modes
        arch = None
        if self.export is not None:
            from nemo_quant.models.arch import arch_of_megatron

            arch = arch_of_megatron(model, self.vocab_size)
        preflight(model, arch, modes, self.export)  # before Lightning runs any step
        apply_modes(model, modes)
        self._model = model
        # Lightning loads the weights before callbacks see the checkpoint, but right after
        # the LightningModule's own on_load_checkpoint: check the modes there, so a mismatch
        # is reported as such rather than as tensor shape errors.
        if not getattr(pl_module, "_nemo_quant_checks_modes", False):
            original = pl_module.on_load_checkpoint

            def check_then_load(checkpoint: dict) -> None:
                self._check_modes(checkpoint.get(CHECKPOINT_KEY))
                original(checkpoint)

            pl_module.on_load_checkpoint = check_then_load
            pl_module._nemo_quant_checks_modes = True

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if all(q.is_calibrated for _, q in quantizers(self._model)):
            return  # resumed from a checkpoint that holds the scales

        def loop(model: nn.Module) -> None:
            for batch in islice(iter(trainer.train_dataloader), self.calib_batches):
                tokens = self.batch_tokens(batch).to(pl_module.device)
                model(tokens, position_ids_for(tokens), None)

        calibrate(self._model, loop)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.export is None:
            return
        from nemo_quant.export import export_checkpoint
        from nemo_quant.models.arch import arch_of_megatron

        export_checkpoint(self._model, arch_of_megatron(self._model, self.vocab_size), self.export)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = mode_state(self._model)

    def _check_modes(self, saved: list | None) -> None:
        if saved is None:
            raise RuntimeError("the checkpoint has no nemo_quant mode state; it was not written with NemoQuantCallback.")
        current = mode_state(self._model) if self._model is not None else []
        if saved != current:
            raise RuntimeError(f"checkpoint modes {[m['name'] for m in saved]} differ from the configured ones "
                               f"{[m['name'] for m in current]} (or their configs); resume with the same quant config.")
