"""What the heads train on (self-distillation: the base is the only teacher): Medusa and MTP by
cross entropy against the base's greedy token at p+1 (what greedy verification accepts at p+2;
on the base's own continuations it is x[p+2]), EAGLE by soft cross entropy against the base's
distribution at p+1 (KL, same gradient); draft step s weighted step_decay**s; all on the
vocab-parallel logits, never gathered."""
from __future__ import annotations

import torch

from nemo_quant.speculative.base_view import BaseView
from nemo_quant.speculative.unroll import valid_rows


def shifted(x: torch.Tensor, by: int, dim: int) -> torch.Tensor:
    """Row p holds row p + by (the tail repeats the last row; masked out by valid_rows)."""
    index = torch.arange(x.shape[dim], device=x.device).add(by).clamp(max=x.shape[dim] - 1)
    return x.index_select(dim, index)


def hard_targets(view: BaseView) -> torch.Tensor:
    """x[p+2] at row p, [s, b]."""
    return shifted(view.tokens, 2, 1).t().contiguous()


def base_greedy_targets(view: BaseView, true_vocab: int) -> torch.Tensor:
    """The base's argmax at p+1 at row p, [s, b]."""
    from nemo_quant.speculative.vocab import vocab_parallel_argmax

    return shifted(vocab_parallel_argmax(view.logits, true_vocab), 1, 1).t().contiguous()


def soft_targets(view: BaseView, draft) -> torch.Tensor:
    """The base's logits at p+1, [s, b, V/tp] (over the draft vocabulary when it is reduced)."""
    target = shifted(view.logits, 1, 1).transpose(0, 1)
    ids = getattr(draft, "draft_ids", None)
    if ids is None:
        return target
    from nemo_quant.speculative.vocab import pick_columns
    from nemo_quant.distributed import tp_rank_and_size

    return pick_columns(target, ids, draft.lm_head.weight.shape[0] * tp_rank_and_size()[1])


def draft_loss(draft, view: BaseView, steps: int, decay: float, scale: float, true_vocab: int) -> tuple[torch.Tensor, list[float]]:
    """The weighted loss over steps and each step's top-1 accuracy on the valid rows."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_quant.distill.kl import vocab_parallel_kl

    logits = draft.draft_logits(view, steps)
    seq = view.tokens.shape[1]
    soft = draft.uses_base_logits
    greedy = base_greedy_targets(view, true_vocab)
    target = soft_targets(view, draft) if soft else greedy
    vocab = draft.draft_ids.numel() if getattr(draft, "draft_ids", None) is not None else true_vocab
    total = torch.zeros((), dtype=torch.float32)
    accuracy = []
    for s, out in enumerate(logits):
        rows = valid_rows(seq, s, out.device)
        if soft:
            per_token = vocab_parallel_kl(out, target, 1.0, vocab)
        else:
            per_token = vocab_parallel_cross_entropy(out.float(), target)
        total = total + decay ** s * per_token[rows].mean()
        accuracy.append(float((predicted_ids(draft, out)[rows] == greedy[rows]).float().mean()))
    return scale * total, accuracy


def predicted_ids(draft, logits: torch.Tensor) -> torch.Tensor:
    """Greedy base-vocabulary ids of vocab-parallel draft logits [s, b, V/tp] -> [s, b]."""
    from nemo_quant.speculative.vocab import vocab_parallel_argmax

    ids = vocab_parallel_argmax(logits.detach(), getattr(draft, "vocab_limit", None))
    mapping = getattr(draft, "draft_ids", None)
    return ids if mapping is None else mapping[ids]
