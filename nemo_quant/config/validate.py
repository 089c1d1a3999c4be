"""Semantic checks the type system cannot express, run before any work starts."""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig


class ConfigError(ValueError):
    """A config value is wrong; the message names the key and the fix."""


def _positive(cfg: DictConfig, key: str) -> None:
    value = cfg
    for part in key.split("."):
        value = value[part]
    if value < 1:
        raise ConfigError(f"{key}={value}: must be a positive integer.")


def validate(cfg: DictConfig) -> None:
    for key in ("parallel.tp", "parallel.pp", "parallel.timeout_s", "data.seq_length",
                "data.calib_samples", "data.eval_samples", "data.batch_size"):
        _positive(cfg, key)
    if cfg.data.seq_length < 2:
        raise ConfigError(f"data.seq_length={cfg.data.seq_length}: a window needs at least 2 tokens.")
    if cfg.model.path is not None and not Path(cfg.model.path).expanduser().exists():
        raise ConfigError(f"model.path={cfg.model.path} does not exist; give a .gguf file or an HF safetensors directory.")
    if cfg.data.name == "files":
        for key in ("calib_files", "eval_files"):
            for path in cfg.data[key]:
                if not Path(path).expanduser().is_file():
                    raise ConfigError(f"data.{key}: {path} does not exist.")
        if not cfg.data.eval_files and cfg.command in ("eval", "ptq", "prune"):
            raise ConfigError(f"data.name=files needs data.eval_files=[...] for `nemo-quant {cfg.command.value}`.")
        if not cfg.data.calib_files and cfg.command in ("ptq", "train", "prune"):
            raise ConfigError(f"data.name=files needs data.calib_files=[...] for `nemo-quant {cfg.command.value}`.")
    _validate_command(cfg)


def _validate_command(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from nemo_quant.quantization.validate import validate_quant_config

    if cfg.checkpoint.load is not None and not (Path(cfg.checkpoint.load).expanduser() / "model").is_dir():
        raise ConfigError(f"checkpoint.load={cfg.checkpoint.load} is not a nemo_quant checkpoint directory.")
    if cfg.command == "ptq":
        if cfg.quant is None and cfg.sparsity is None:
            raise ConfigError("`nemo-quant ptq` needs a mode: add quant=<preset> (fp8, int8_sq, int4_awq, w4a8_awq, "
                              "nvfp4, nvfp4_awq, mxfp8, int8_weight_only, int4_weight_only) and/or sparsity=<preset> "
                              "(admm, sparsegpt, magnitude).")
        if cfg.checkpoint.save is not None and Path(cfg.checkpoint.save).expanduser().exists() and not cfg.checkpoint.overwrite:
            raise ConfigError(f"checkpoint.save={cfg.checkpoint.save} exists; pick a new path or set checkpoint.overwrite=true.")
    _validate_prune(cfg)
    _validate_distill(cfg)
    if cfg.quant is not None:
        validate_quant_config(OmegaConf.to_object(cfg.quant))
    if cfg.sparsity is not None:
        from nemo_quant.sparsity.mode import validate_sparsity_config

        validate_sparsity_config(OmegaConf.to_object(cfg.sparsity))
    if cfg.get("qlora") is not None:
        _validate_qlora(cfg)
    _validate_speculative(cfg)
    _validate_export(cfg)
    if cfg.command == "train":
        if cfg.checkpoint.save is None:
            raise ConfigError("`nemo-quant train` needs checkpoint.save=<dir> for its periodic checkpoints.")
        for key in ("steps", "micro_batch_size", "seq_length", "save_every", "log_every"):
            _positive(cfg, f"train.{key}")
        if cfg.train.lr <= 0:
            raise ConfigError(f"train.lr={cfg.train.lr}: must be positive.")
        if cfg.train.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps={cfg.train.warmup_steps}: must be >= 0.")
        betas = list(cfg.train.adam_betas)
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ConfigError(f"train.adam_betas={betas}: give two values in [0, 1), e.g. [0.9, 0.95].")



def _validate_speculative(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    spec = cfg.get("speculative")
    if spec is None:
        return
    if cfg.command not in ("train", "eval", "export"):
        raise ConfigError(f"speculative={spec.name} adds draft heads that must be trained: use `nemo-quant train "
                          f"speculative={spec.name} ...` (then eval / export with checkpoint.load=<dir>).")
    if cfg.command in ("eval", "export") and cfg.checkpoint.load is None:
        raise ConfigError(f"`nemo-quant {cfg.command.value} speculative={spec.name}` needs the trained heads: "
                          "checkpoint.load=<dir written by nemo-quant train speculative=...>.")
    if cfg.get("qlora") is not None:
        raise ConfigError("speculative heads need a frozen base and qlora trains adapters on it: train the QLoRA "
                          "model, merge it (export=merged), then train heads on the merged model.")
    if cfg.get("distill") is not None:
        raise ConfigError("speculative heads bring their own objective (self-distillation from the base): drop distill.")
    from nemo_quant.speculative.mode import validate_speculative_config

    validate_speculative_config(OmegaConf.to_object(spec))


def _validate_prune(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    if cfg.command == "prune":
        if cfg.get("prune") is None:
            raise ConfigError("`nemo-quant prune` needs prune=<preset>: minitron_ffn, minitron_depth, minitron_budget, "
                              "or prune=minitron prune.target.<dimension>=... (see conf/prune/).")
        if cfg.quant is not None or cfg.sparsity is not None or cfg.get("qlora") is not None:
            raise ConfigError("`nemo-quant prune` prunes only: drop quant/sparsity/qlora here and run ptq or train on "
                              "the pruned checkpoint (checkpoint.load=<dir>), or use `nemo-quant ptq prune=... quant=...`.")
        if cfg.checkpoint.save is not None and Path(cfg.checkpoint.save).expanduser().exists() and not cfg.checkpoint.overwrite:
            raise ConfigError(f"checkpoint.save={cfg.checkpoint.save} exists; pick a new path or set checkpoint.overwrite=true.")
    if cfg.get("prune") is None:
        return
    if cfg.command in ("eval", "export"):
        raise ConfigError(f"prune=... would be ignored by `nemo-quant {cfg.command.value}`: prune with `nemo-quant "
                          "prune prune=... checkpoint.save=<dir>`, then pass checkpoint.load=<dir>.")
    from nemo_quant.pruning.mode import validate_prune_config

    validate_prune_config(OmegaConf.to_object(cfg.prune))


def _validate_distill(cfg: DictConfig) -> None:
    d = cfg.get("distill")
    if d is None:
        return
    if cfg.command != "train":
        raise ConfigError(f"distill={d.name} is a training objective: use it with `nemo-quant train`.")
    if d.temperature <= 0:
        raise ConfigError(f"distill.temperature={d.temperature}: must be > 0.")
    for key in ("kd_weight", "lm_weight", "layer_weight"):
        if d[key] < 0:
            raise ConfigError(f"distill.{key}={d[key]}: must be >= 0.")
    if d.kd_weight == 0 and d.lm_weight == 0 and not d.layers:
        raise ConfigError("distill.kd_weight and distill.lm_weight are both 0 and distill.layers is empty: nothing to train on.")
    from nemo_quant.distill.objective import parse_layer_pairs

    parse_layer_pairs(list(d.layers))
    if d.teacher is not None and not Path(d.teacher).expanduser().exists():
        raise ConfigError(f"distill.teacher={d.teacher} does not exist: give a nemo_quant checkpoint directory, a .gguf "
                          "file or an HF directory, or leave it null to distill from model.path's model.")


def _validate_qlora(cfg: DictConfig) -> None:
    from omegaconf import OmegaConf

    from nemo_quant.qlora.mode import validate_qlora_config

    if cfg.quant is not None:
        raise ConfigError(f"quant={cfg.quant.name} and qlora={cfg.qlora.name} would both quantize the same weights "
                          "(QLoRA's NF4 base is their quantization). Train with qlora alone, export it with "
                          "export=merged, then run `nemo-quant ptq quant=... model.path=<the merged export>`.")
    if cfg.sparsity is not None:
        raise ConfigError("sparsity and qlora in one job: the NF4 base would not keep the sparsity masks; "
                          "remove sparsity=... or qlora=...")
    if cfg.command != "train":
        raise ConfigError(f"qlora={cfg.qlora.name} trains adapters: run `nemo-quant train qlora=... "
                          f"checkpoint.save=<dir>`; `nemo-quant {cfg.command.value}` takes the trained model with "
                          "checkpoint.load=<dir>/step_N (drop qlora=...).")
    validate_qlora_config(OmegaConf.to_object(cfg.qlora))


def _validate_export(cfg: DictConfig) -> None:
    if cfg.command == "export" and cfg.export is None:
        raise ConfigError("`nemo-quant export` needs an export preset: add export=hf, export=trtllm, export=both or "
                          "export=draft (speculative heads), "
                          "and export.path=<dir>.")
    if cfg.export is None:
        return
    if cfg.export.path is None:
        raise ConfigError("export.path is not set; give the directory to write (export.path=/path/to/ckpt).")
    if Path(cfg.export.path).expanduser().exists() and not cfg.export.overwrite:
        raise ConfigError(f"export.path={cfg.export.path} exists; pick a new path or set export.overwrite=true.")
    for key in ("inference_tp", "inference_pp"):
        _positive(cfg, f"export.{key}")
    if cfg.export.max_shard_size_gb <= 0:
        raise ConfigError(f"export.max_shard_size_gb={cfg.export.max_shard_size_gb}: must be positive.")
