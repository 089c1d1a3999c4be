"""The base's own greedy continuations of prompts: the heads' self-distilled training data and the
ground truth of the acceptance measurement. Decoded with a KV cache at the job's TP, and cached under $NEMO_QUANT_CACHE/continuations keyed by
the base's fingerprint, the prompts, the length, the layout and the code versions."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from nemo_quant.runtime.pipeline import position_ids_for
from nemo_quant.utils.progress import progress


def greedy_continue(model: nn.Module, prompts: torch.Tensor, new_tokens: int, true_vocab: int,
                    batch_size: int = 16) -> torch.Tensor:
    """[n, p] prompts -> [n, p + new_tokens]: each step appends the base's argmax (PP=1), decoded
    with megatron-core's static KV cache (it reproduces full re-forwards token for token; tested)."""
    from megatron.core.inference.contexts import StaticInferenceContext

    out = []
    bar = progress(total=prompts.shape[0] * new_tokens, desc="greedy continuations", unit="tok")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in prompts.split(batch_size):
                context = StaticInferenceContext(batch.shape[0], batch.shape[1] + new_tokens)
                step, positions, generated = batch, position_ids_for(batch), []
                for _ in range(new_tokens):
                    logits = model(step, positions, None, inference_context=context, runtime_gather_output=True)
                    context.sequence_len_offset += step.shape[1]
                    context.enable_decode_mode()
                    step = logits[:, -1, :true_vocab].argmax(-1, keepdim=True)
                    positions = torch.full_like(step, context.sequence_len_offset)
                    generated.append(step)
                    bar.update(batch.shape[0])
                out.append(torch.cat([batch, *generated], dim=1))
    finally:
        model.train(was_training)
        bar.close()
    return torch.cat(out)


def _key(model: nn.Module, prompts: torch.Tensor, new_tokens: int) -> str:
    """Base, first prompt, lengths, layout and code versions: runs over more (or fewer) of the same
    prompts share one entry, which grows as needed."""
    from importlib.metadata import version

    from nemo_quant.distributed import tp_rank_and_size
    from nemo_quant.speculative.mode import fingerprint

    parts = [fingerprint(model), hashlib.sha256(prompts[0].numpy().tobytes()).hexdigest()[:16], str(prompts.shape[1]),
             str(new_tokens), f"tp{tp_rank_and_size()[1]}", str(next(model.parameters()).dtype),
             *(f"{p}={version(p)}" for p in ("nemo_quant", "megatron-core", "torch"))]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]


def cached_continuations(model: nn.Module, prompts: torch.Tensor, new_tokens: int, true_vocab: int,
                         batch_size: int = 16) -> torch.Tensor:
    """`greedy_continue`, read from / added to the cache (written atomically by the main rank): only
    the prompts the entry lacks are decoded."""
    from safetensors.torch import load_file, save_file

    from nemo_quant.distributed import barrier
    from nemo_quant.runtime.distributed_init import is_main_rank
    from nemo_quant.utils.cache import cache_root

    path = cache_root() / "continuations" / f"{_key(model, prompts, new_tokens)}.safetensors"
    have = load_file(str(path))["tokens"] if path.is_file() else prompts.new_zeros(0, prompts.shape[1] + new_tokens)
    known = 0
    while known < min(len(have), len(prompts)) and torch.equal(have[known, : prompts.shape[1]], prompts[known]):
        known += 1
    if known == len(prompts):
        if is_main_rank():
            print(f"[nemo_quant] greedy continuations from the cache: {path}", flush=True)
        return have[:known].clone()
    if known and is_main_rank():
        print(f"[nemo_quant] {known} greedy continuations from the cache ({path}); decoding {len(prompts) - known}",
              flush=True)
    tokens = torch.cat([have[:known], greedy_continue(model, prompts[known:], new_tokens, true_vocab, batch_size)])
    if is_main_rank() and known == len(have):  # the entry grows; a diverging run keeps its own data uncached
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(f"{path}.tmp")
        save_file({"tokens": tokens.contiguous()}, str(tmp))
        tmp.replace(path)
    barrier()
    return tokens
