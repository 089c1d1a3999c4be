"""Functions run inside spawned ranks (module-level so the spawn context can import them)."""
from __future__ import annotations

import torch


def sharded_logits(model_path: str, tp: int, pp: int, tokens: torch.Tensor):
    """Load `model_path` at TP x PP and return the full-vocab logits from the last stage."""
    from megatron.core import parallel_state as ps

    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.runtime.pipeline import forward_batches, gather_vocab_logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    out = forward_batches(loaded.model, [tokens], lambda o, t: gather_vocab_logits(o, loaded.vocab_size), 1)
    return out[0] if ps.is_pipeline_last_stage() else None


def sharded_perplexity(model_path: str, tp: int, pp: int, windows: torch.Tensor) -> float:
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    return perplexity(loaded.model, windows, loaded.vocab_size).perplexity


def greedy_continuation(model_path: str, prompt: str, steps: int) -> str:
    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.runtime.pipeline import forward_batches, gather_vocab_logits

    init_megatron(ParallelLayout(1, 1), timeout_s=120)
    loaded = load_model(model_path)
    ids = loaded.tokenizer.encode(prompt).ids
    for _ in range(steps):
        tokens = torch.tensor([ids])
        logits = forward_batches(loaded.model, [tokens], lambda o, t: gather_vocab_logits(o, loaded.vocab_size), 1)[0]
        ids.append(int(logits[0, -1].argmax()))
    return loaded.tokenizer.decode(ids)


def raise_on_rank(bad_rank: int) -> int:
    import torch.distributed as dist

    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"deliberate failure on rank {bad_rank}")
    dist.barrier()  # the healthy ranks wait here; the parent must not hang on them
    return dist.get_rank()


def hang_forever() -> None:
    import time

    time.sleep(3600)


def world_info() -> tuple[int, int]:
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return dist.get_rank(), int(t.item())
