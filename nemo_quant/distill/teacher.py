"""The frozen teacher of distillation and QAD: by default the configured model as loaded, before
any mode, built by the same loader at the job's TP/PP; or a nemo_quant checkpoint, or another
model (.gguf / HF directory) sharing the student's vocabulary."""
from __future__ import annotations

from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.distill.config import DistillConfig
from nemo_quant.distill.objective import DistillObjective, parse_layer_pairs


def build_teacher(model_path: str | None, dtype: str, tokenizer: str | None, cfg: DistillConfig,
                  student_vocab: int) -> nn.Module:
    from pathlib import Path

    from nemo_quant.models.loading import load_model

    checkpoint = cfg.teacher is not None and (Path(cfg.teacher).expanduser() / "model").is_dir()
    if cfg.teacher is not None and not checkpoint:  # a model of its own (.gguf / HF directory)
        model_path, tokenizer = cfg.teacher, None
    loaded = load_model(model_path, dtype, tokenizer, with_weights=not checkpoint)
    if checkpoint:
        from nemo_quant.checkpoint.model_checkpoint import load_into

        load_into(loaded.model, cfg.teacher)
    if loaded.vocab_size != student_vocab:
        raise ConfigError(f"distill.teacher has a vocabulary of {loaded.vocab_size} tokens but the student has "
                          f"{student_vocab}: distillation compares the two distributions token by token, so the "
                          "teacher must share the student's tokenizer.")
    teacher = loaded.model
    teacher.requires_grad_(False)
    teacher.eval()
    return teacher


def check_layer_pairs(cfg: DistillConfig, student: nn.Module, teacher: nn.Module) -> None:
    """Each pair's layers exist, and sit on one pipeline stage (checked over all ranks)."""
    from nemo_quant.distributed import gather_messages

    pairs = parse_layer_pairs(cfg.layers)
    s_total, t_total = student.config.num_layers, teacher.config.num_layers
    for i, (s, t) in enumerate(pairs):
        if not (0 <= s < s_total and 0 <= t < t_total):
            raise ConfigError(f"distill.layers[{i}]={cfg.layers[i]!r}: the student has layers 0..{s_total - 1}, "
                              f"the teacher 0..{t_total - 1}.")
    mine_s = {layer.layer_number - 1 for layer in student.decoder.layers}
    mine_t = {layer.layer_number - 1 for layer in teacher.decoder.layers}
    split = [i for i, (s, t) in enumerate(pairs) if (s in mine_s) != (t in mine_t)]
    problems = [m for m in gather_messages(
        f"distill.layers[{split[0]}]={cfg.layers[split[0]]!r}: the student's and the teacher's layer sit on different "
        "pipeline stages; pick pairs within one stage or lower parallel.pp." if split else None) if m]
    if problems:
        raise ConfigError(problems[0])


def kept_teacher_channels(cfg: DistillConfig, student: nn.Module, teacher: nn.Module) -> list[int] | None:
    """Which teacher channels a width-pruned student's hidden states hold (its prune plan)."""
    from nemo_quant.modes import mode_config

    if student.config.hidden_size == teacher.config.hidden_size or not cfg.layers:
        return None
    prune = mode_config(student, "prune")
    if prune is None or prune.plan is None or len(prune.plan["hidden"]) != student.config.hidden_size:
        raise ConfigError(f"distill.layers compares hidden states, but the student's hidden size "
                          f"({student.config.hidden_size}) differs from the teacher's ({teacher.config.hidden_size}) "
                          "and no prune plan says which teacher channels it kept; drop distill.layers.")
    return prune.plan["hidden"]


def distill_objective(cfg: DistillConfig, student: nn.Module, teacher: nn.Module, vocab_size: int) -> DistillObjective:
    """The objective of `train` for a student whose modes are applied (layer pairs checked here)."""
    check_layer_pairs(cfg, student, teacher)
    return DistillObjective(teacher, cfg, vocab_size, student, kept_teacher_channels(cfg, student, teacher))
