"""Apply a pruning plan to a built GPTModel in place, at any TP and PP.

Each kept decoder layer is TP-gathered into TP=1's layout (export/gather.gather_module), sliced
there by the plan, and cut again for the new, smaller TP shards: kept neurons or groups need not
sit evenly on the old ranks, so slicing the old shards locally could not give equal new ones.
The slices then fill freshly built Megatron layers (built from the shrunk TransformerConfig, so
every per-partition size and layer number is Megatron's own). Under PP, depth pruning moves
layers between stages (the new count is split evenly); a layer whose new stage differs is sent
there by its old stage, rank to rank within the pipeline group. The embedding, final norm and
output layer keep their TP split (hidden channels are not split) and are sliced in place.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from nemo_quant.distributed import recv_object, send_object
from nemo_quant.export.gather import gather_module
from nemo_quant.models.megatron_layout import cols, fc1_rows_of_rank, rows

QKV, PROJ, FC1, FC2 = ("self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                       "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
NORMS = ("input_layernorm.weight", "pre_mlp_layernorm.weight")


def slice_layer(full: dict[str, torch.Tensor], plan: dict, j: int, groups: int, head_dim: int) -> dict[str, torch.Tensor]:
    """A gathered layer (TP=1 layout) -> the kept layer's tensors (TP=1 layout); j: its new index."""
    unknown = set(full) - {QKV, PROJ, FC1, FC2, *NORMS}
    if unknown:
        raise RuntimeError(f"pruning does not know how to slice {sorted(unknown)} (only plain Megatron local-spec "
                           "layers without biases are supported); prune before any other mode.")
    hidden = torch.tensor(plan["hidden"])
    kept_groups, kept_heads, neurons = plan["groups"][j], plan["heads"][j], torch.tensor(plan["ffn"][j])
    qkv = full[QKV]
    per_group = qkv.shape[0] // (groups * head_dim) - 2
    by_group = qkv.reshape(groups, per_group + 2, head_dim, -1)
    blocks = []
    for g in kept_groups:
        q_heads = [h - g * per_group for h in kept_heads if g * per_group <= h < (g + 1) * per_group]
        blocks.append(by_group[g, [*q_heads, per_group, per_group + 1]])
    new_qkv = torch.cat(blocks).reshape(-1, qkv.shape[1])
    proj = full[PROJ].reshape(full[PROJ].shape[0], -1, head_dim)[:, kept_heads].reshape(full[PROJ].shape[0], -1)
    gate, up = full[FC1].chunk(2, dim=0)
    out = {
        QKV: new_qkv[:, hidden],
        PROJ: proj[hidden],
        FC1: torch.cat([gate[neurons], up[neurons]])[:, hidden],
        FC2: full[FC2][hidden][:, neurons],
    }
    for name in NORMS:
        out[name] = full[name][hidden]
    return {k: v.contiguous() for k, v in out.items()}


def shard_layer(tensors: dict[str, torch.Tensor], tp_rank: int, tp: int) -> dict[str, torch.Tensor]:
    """TP=1 layout -> this TP rank's shard (qkv rows are group-major, so whole groups per rank)."""
    return {
        QKV: rows(tensors[QKV], tp_rank, tp).clone(),
        PROJ: cols(tensors[PROJ], tp_rank, tp).clone(),
        FC1: fc1_rows_of_rank(tensors[FC1], tp_rank, tp).clone(),
        FC2: cols(tensors[FC2], tp_rank, tp).clone(),
        **{name: tensors[name].clone() for name in NORMS},
    }


@contextmanager
def _quiet_build():
    """Build modules without moving the caller's RNG (their random init is overwritten). Megatron
    sets the TP attributes of a weight only when it initialises it, so the init must run."""
    with torch.random.fork_rng(devices=[]):
        yield


def _resize_config(config, sizes: dict, head_dim: int) -> None:
    # One TransformerConfig object is shared by every module of the model.
    config.kv_channels = head_dim
    for key, value in sizes.items():
        setattr(config, key, value)


def _replace_parameter(owner: nn.Module, name: str, value: torch.Tensor) -> None:
    old = getattr(owner, name)
    new = nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    for attr, v in vars(old).items():  # Megatron's TP attributes (partition_dim, shared, ...)
        setattr(new, attr, v)
    setattr(owner, name, new)


def _slice_model_level(model: nn.Module, hidden: list[int]) -> None:
    index = torch.tensor(hidden)
    if getattr(model, "pre_process", False):
        emb = model.embedding.word_embeddings
        _replace_parameter(emb, "weight", emb.weight.detach()[:, index])
        emb.embedding_dim = len(hidden)
    if getattr(model, "post_process", False):
        norm = model.decoder.final_layernorm
        _replace_parameter(norm, "weight", norm.weight.detach()[index])
        norm.normalized_shape = (len(hidden),)
        head = model.output_layer
        if head.weight is not None:
            _replace_parameter(head, "weight", head.weight.detach()[:, index])
        head.input_size = len(hidden)


def _pipeline():
    from megatron.core import parallel_state as ps

    if not dist.is_initialized():
        return 0, 1, 0, 1, [0]
    ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    return (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size(),
            ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(), ranks)


def parallel_sizes() -> tuple[int, int]:
    """(TP, PP) of the running job (1, 1 without one)."""
    _, tp, _, pp, _ = _pipeline()
    return tp, pp


def apply_plan(model: nn.Module, plan: dict) -> None:
    """Shrink `model` to the plan, in place; collective over every rank of the model."""
    from megatron.core.transformer.spec_utils import build_module

    config, block = model.config, model.decoder
    tp_rank, tp, stage, pp, stage_ranks = _pipeline()
    groups, head_dim, old_layers = config.num_query_groups, config.kv_channels, list(block.layers)
    old_per_stage = config.num_layers // pp
    sizes = plan["sizes"]
    new_per_stage = sizes["num_layers"] // pp
    mine: dict[int, dict[str, torch.Tensor]] = {}
    for j, g in enumerate(plan["layers"]):
        src, dst = g // old_per_stage, j // new_per_stage
        if stage == src:
            full = gather_module(old_layers[g - src * old_per_stage])
            local = shard_layer(slice_layer(full, plan, j, groups, head_dim), tp_rank, tp)
            if dst == stage:
                mine[j] = local
            else:
                send_object(local, stage_ranks[dst])
        elif stage == dst:
            mine[j] = recv_object(stage_ranks[src])
    _resize_config(config, sizes, head_dim)
    spec = block.submodules.layer_specs[0]
    new_layers = []
    with _quiet_build():
        for i in range(new_per_stage):
            layer = build_module(spec, config=config, layer_number=i + 1, pg_collection=block.pg_collection,
                                 vp_stage=block.vp_stage)
            missing, unexpected = layer.load_state_dict(mine.pop(stage * new_per_stage + i), strict=False)
            missing = [k for k in missing if not k.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"pruned layer does not fit Megatron's layer: missing {missing}, unexpected {unexpected}")
            new_layers.append(layer.to(old_layers[0].input_layernorm.weight.device))
    block.layers = nn.ModuleList(new_layers)
    block.submodules.layer_specs = [spec] * new_per_stage
    _slice_model_level(model, plan["hidden"])


def is_applied(model: nn.Module, plan: dict) -> bool:
    """The model already has the plan's shapes (built from a pruned architecture)."""
    c = model.config
    return all(getattr(c, key) == value for key, value in plan["sizes"].items())
