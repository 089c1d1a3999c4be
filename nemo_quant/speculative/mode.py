"""The speculative modes `medusa`, `eagle` (EAGLE-3, or EAGLE-1) and `mtp`: draft modules added in
place to the Megatron GPTModel (`model.speculative`), TP-sharded like the base, the base frozen.

Initialisation is seeded and built from full (CPU) master weights, so every TP layout starts
from the same draft. Checkpoints of a model with heads hold only the heads (and the mode state):
the base is rebuilt from model.path, and its fingerprint, recorded when the heads were added,
must match.
"""
from __future__ import annotations

import dataclasses
import hashlib

import torch
from torch import nn

from nemo_quant.config.validate import ConfigError
from nemo_quant.modes import Mode, register_mode
from nemo_quant.speculative.config import Method, SpeculativeConfig

ATTR = "speculative"
KEY_PREFIX = f"{ATTR}."


def default_aux_layers(num_layers: int) -> list[int]:
    """Low, middle and high layer outputs ([1, 14, 26] of 30 layers), as EAGLE-3 and the engines pick them
    (deduplicated on small models, as ModelOpt does)."""
    return sorted({min(1, num_layers - 1), max(0, num_layers // 2 - 1), max(0, num_layers - 4)})


def aux_layers(cfg: SpeculativeConfig, num_layers: int) -> list[int]:
    return list(cfg.aux_layers) if cfg.aux_layers is not None else default_aux_layers(num_layers)


def validate_speculative_config(cfg: SpeculativeConfig) -> None:
    method = Method(cfg.method)
    if cfg.num_heads < 1 or cfg.head_layers < 1:
        raise ConfigError(f"speculative.num_heads={cfg.num_heads} / head_layers={cfg.head_layers}: must be >= 1.")
    if cfg.ttt_steps < 1:
        raise ConfigError(f"speculative.ttt_steps={cfg.ttt_steps}: must be >= 1 (1 = no training-time test).")
    if not 0 < cfg.step_decay <= 1 or cfg.loss_weight <= 0:
        raise ConfigError("speculative.step_decay must be in (0, 1] and speculative.loss_weight > 0.")
    if cfg.draft_vocab_size is not None and method != Method.eagle3:
        raise ConfigError(f"speculative.draft_vocab_size is EAGLE-3's reduced vocabulary; {method.value} drafts over "
                          "the base's vocabulary: drop it or use speculative=eagle3.")
    if cfg.aux_layers is not None and method != Method.eagle3:
        raise ConfigError(f"speculative.aux_layers feeds EAGLE-3's fused features; {method.value} does not read them.")
    if cfg.prompt_tokens < 2 or cfg.continuation_tokens < 2:
        raise ConfigError("speculative.prompt_tokens and speculative.continuation_tokens must be >= 2.")


def _check(model: nn.Module, cfg: SpeculativeConfig) -> None:
    from megatron.core import parallel_state as ps

    from nemo_quant.models.builder import true_vocab_size

    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise ConfigError(f"speculative={cfg.name}: the draft reads the base's hidden states and embedding on one "
                          "stage; pipeline parallelism is not served yet: train heads with parallel.pp=1 (any "
                          "parallel.tp), the checkpoint reshards to other layouts for export.")
    if getattr(model, ATTR, None) is not None:
        raise ConfigError("the model already carries speculative heads; one draft per model.")
    layers = model.config.num_layers
    if Method(cfg.method) == Method.eagle3:
        chosen = aux_layers(cfg, layers)
        bad = [i for i in chosen if not 0 <= i < layers]
        if bad or len(set(chosen)) != len(chosen) or not chosen:
            raise ConfigError(f"speculative.aux_layers={chosen}: give distinct base layers in 0..{layers - 1} "
                              f"(default {default_aux_layers(layers)}).")
    vocab = true_vocab_size(model)
    if cfg.draft_vocab_size is not None and not 1 <= cfg.draft_vocab_size <= vocab:
        raise ConfigError(f"speculative.draft_vocab_size={cfg.draft_vocab_size} must be in 1..{vocab} (the base's "
                          "vocabulary); null keeps the full vocabulary.")


def fingerprint(model: nn.Module) -> str:
    """A TP-invariant digest of the base: the final norm's bytes and the float64 sum of the output weights."""
    from nemo_quant.distributed import tp_all_reduce
    from nemo_quant.speculative.base_view import base_head_weight

    norm = model.decoder.final_layernorm.weight.detach().float().contiguous()
    total = tp_all_reduce(base_head_weight(model).detach().double().sum().reshape(1), "sum")
    digest = hashlib.sha256(norm.numpy().tobytes()).hexdigest()[:16]
    return f"{digest}:{float(total):.9e}"


def draft_config(model: nn.Module, cfg: SpeculativeConfig):
    """The base's TransformerConfig with initialisation on, from CPU master weights (TP-invariant)."""
    return dataclasses.replace(model.config, perform_initialization=True, use_cpu_initialization=True,
                               mtp_num_layers=1 if Method(cfg.method) == Method.mtp else None)


def build_draft(model: nn.Module, cfg: SpeculativeConfig) -> nn.Module:
    from nemo_quant.models.builder import layer_spec, true_vocab_size
    from nemo_quant.speculative.base_view import base_head_weight

    method = Method(cfg.method)
    config = draft_config(model, cfg)
    head = base_head_weight(model).detach()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        if method == Method.medusa:
            from nemo_quant.speculative.medusa import MedusaHeads

            draft = MedusaHeads(config, cfg.num_heads, cfg.head_layers, head.shape[0] * _tp(), head)
            draft.vocab_limit = true_vocab_size(model)
        elif method in (Method.eagle3, Method.eagle1):
            from nemo_quant.speculative.eagle import EagleDraft

            draft = _eagle(config, model, cfg, head)
        else:
            from nemo_quant.speculative.mtp import MTPDraft

            draft = MTPDraft(config, layer_spec(), max_steps=8)
            draft.vocab_limit = true_vocab_size(model)
    return draft.to(head.dtype)


def _tp() -> int:
    from nemo_quant.distributed import tp_rank_and_size

    return tp_rank_and_size()[1]


def _eagle(config, model, cfg: SpeculativeConfig, head: torch.Tensor):
    from nemo_quant.models.arch import padded_vocab_size
    from nemo_quant.models.builder import true_vocab_size
    from nemo_quant.speculative.eagle import EagleDraft

    if Method(cfg.method) == Method.eagle1:
        draft = EagleDraft(config, 1, [], None, None, None, max_steps=8)
        draft.vocab_limit = true_vocab_size(model)
        return draft
    layers = aux_layers(cfg, model.config.num_layers)
    if cfg.draft_vocab_size is None:
        draft = EagleDraft(config, 3, layers, head.shape[0] * _tp(), head, None, max_steps=8)
        draft.vocab_limit = true_vocab_size(model)
        return draft
    ids = torch.arange(cfg.draft_vocab_size)  # placeholder: the data step picks the tokens
    padded = padded_vocab_size(cfg.draft_vocab_size, _tp())
    from nemo_quant.speculative.vocab import pick_rows

    draft = EagleDraft(config, 3, layers, padded, pick_rows(head, ids, padded), ids, max_steps=8)
    draft.vocab_limit = cfg.draft_vocab_size
    return draft


def _apply(model: nn.Module, cfg: SpeculativeConfig) -> None:
    model.requires_grad_(False)
    draft = build_draft(model, cfg)
    draft.requires_grad_(True)
    setattr(model, ATTR, draft)
    if cfg.base_fingerprint is None:
        cfg.base_fingerprint = fingerprint(model)


def choose_draft_vocab(model: nn.Module, forward_loop) -> dict | None:
    """EAGLE-3's data step: the draft vocabulary = the most frequent tokens of the calibration
    windows; the head's rows start from the base's rows of those tokens."""
    from nemo_quant.models.builder import true_vocab_size
    from nemo_quant.speculative.base_view import base_head_weight
    from nemo_quant.speculative.vocab import most_frequent_tokens, pick_rows

    draft = getattr(model, ATTR)
    if getattr(draft, "draft_ids", None) is None:
        return None
    windows = getattr(forward_loop, "windows", None)
    if windows is None:
        raise ConfigError("speculative.draft_vocab_size counts token frequencies in the calibration windows: pass a "
                          "loop from windows_forward_loop(...).")
    ids = most_frequent_tokens(windows, draft.draft_ids.numel(), true_vocab_size(model))
    covered = float(torch.isin(windows.reshape(-1), ids).double().mean())
    with torch.no_grad():
        draft.draft_ids.copy_(ids)
        draft.lm_head.weight.copy_(pick_rows(base_head_weight(model).detach(), ids, draft.lm_head.weight.shape[0] * _tp()))
    return {"draft_vocab_size": ids.numel(), "calibration_token_coverage": covered}


def _loaded_problem(model: nn.Module, cfg: SpeculativeConfig) -> str | None:
    if cfg.base_fingerprint is not None and fingerprint(model) != cfg.base_fingerprint:
        return ("its speculative heads were trained on another base model (fingerprint differs): load them onto the "
                "model.path they were trained on")
    return None


def heads_only(name: str) -> Mode:
    return register_mode(Mode(
        name=name,
        config_class=SpeculativeConfig,
        apply=_apply,
        may_follow=frozenset({"prune", "sparsity", "quantize"}),
        validate=validate_speculative_config,
        check=_check,
        data_step=choose_draft_vocab,
        loaded_problem=_loaded_problem,
        decisions=frozenset({"base_fingerprint"}),
        checkpoint_prefixes=(KEY_PREFIX,),
    ))


MEDUSA, EAGLE, MTP = heads_only("medusa"), heads_only("eagle"), heads_only("mtp")
