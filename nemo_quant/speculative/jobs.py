"""What the `train` and `eval` commands do for a model with speculative heads: the self-distilled
training windows and the acceptance report."""
from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.speculative.config import SpeculativeConfig, TrainData


def heads_config(model: nn.Module) -> SpeculativeConfig | None:
    """The config the model's heads were added with (None without heads)."""
    from nemo_quant.modes import mode_config, mode_state

    for entry in mode_state(model):
        if entry["name"] in ("medusa", "eagle", "mtp"):
            return mode_config(model, entry["name"])
    return None


def training_sequences(cfg: DictConfig, spec: SpeculativeConfig, model: nn.Module, windows: torch.Tensor,
                       true_vocab: int) -> torch.Tensor:
    """`speculative.data=self`: the first prompt_tokens of each training window continued greedily by
    the base for continuation_tokens (cached); `text`: the windows as they are."""
    if TrainData(spec.data) == TrainData.text:
        return windows
    from nemo_quant.speculative.continuations import cached_continuations

    needed = min(windows.shape[0], cfg.train.steps * cfg.train.micro_batch_size)
    if windows.shape[1] < spec.prompt_tokens:
        from nemo_quant.config.validate import ConfigError

        raise ConfigError(f"speculative.prompt_tokens={spec.prompt_tokens} exceeds train.seq_length + 1 = "
                          f"{windows.shape[1]}; lower it or raise train.seq_length.")
    prompts = windows[:needed, : spec.prompt_tokens]
    if is_main_rank():
        print(f"[nemo_quant] speculative: {needed} self-distilled sequences ({spec.prompt_tokens}-token prompts + "
              f"{spec.continuation_tokens} greedy tokens of the base = {needed * spec.continuation_tokens:,} "
              "continuation tokens)", flush=True)
    return cached_continuations(model, prompts, spec.continuation_tokens, true_vocab)


def acceptance_report(cfg: DictConfig, model: nn.Module, tokenizer, true_vocab: int) -> dict:
    """tau for k in draft_lengths and per-position acceptance on the evaluation prompts."""
    from omegaconf import OmegaConf

    from nemo_quant.data.datasets import strided_prompts
    from nemo_quant.eval.acceptance import measure_acceptance
    from nemo_quant.speculative.continuations import cached_continuations

    from nemo_quant.config.validate import ConfigError
    from nemo_quant.speculative.config import MODE_OF_METHOD

    spec, heads = heads_config(model), heads_config(model)
    if cfg.get("speculative") is not None:
        spec = OmegaConf.to_object(cfg.speculative)
        if heads is None or MODE_OF_METHOD[spec.method] != MODE_OF_METHOD[heads.method]:
            raise ConfigError(f"speculative={cfg.speculative.name} but {cfg.checkpoint.load} holds "
                              f"{'no heads' if heads is None else heads.method.value + ' heads'}: drop speculative= "
                              "(the checkpoint's heads are measured) or load the matching checkpoint.")
    prompts = strided_prompts(cfg.data, tokenizer, "evaluation", spec.eval_prompts, spec.prompt_tokens,
                              spec.eval_stride)
    sequences = cached_continuations(model, prompts, spec.continuation_tokens, true_vocab)
    result = measure_acceptance(model, sequences, spec.prompt_tokens, tuple(spec.draft_lengths))
    return {"prompts": int(prompts.shape[0]), "tau": result.tau, "accept_rate": result.accept_rate,
            "top1": result.top1, "verification_steps": result.steps}
