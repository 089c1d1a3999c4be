"""One linear layer as the algorithms (quantization, sparsity) see it: its whole weight, in TP=1's layout.

Every rank gathers the layer's full weight (column-parallel rows are all-gathered and put in
TP=1's row order, gated fc1's per-rank [gate_r; up_r] included; row-parallel input columns
are all-gathered), runs exactly the computation TP=1 runs on it, and keeps its own share of
the result. Nothing a search decides is summed over ranks, so every decision (scales, clip
ratios, GPTQ's rounding) is bit-identical to TP=1's, not merely close: the searches do TP=1's
work on each rank, which costs time on TP > 1 layouts but never a different answer.
"""
from __future__ import annotations

import torch
from torch import nn

from nemo_quant.models.megatron_layout import fc1_rows_of_rank
from nemo_quant.numerics.blocks import to_blocks
from nemo_quant.quantization.algorithms.observe import (
    gather_input_dim, gather_output_dim, is_row_parallel, tp_size_of, weight_block_size,
)
from nemo_quant.quantization.config import NO_CALIBRATION, Granularity, QFormat, QuantizerSpec
from nemo_quant.quantization.fake_quant import fake_quant


class LinearView:
    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.row_parallel = is_row_parallel(module)
        self.tp = tp_size_of(module)
        self.gated = bool(getattr(module, "_nq_swiglu", False))
        # A copy: the view must not alias the parameter it later writes back into.
        local = module.weight.detach().float().clone()
        self.weight = gather_input_dim(module, local) if self.row_parallel else gather_output_dim(module, local)
        wq, iq = getattr(module, "weight_quantizer", None), getattr(module, "input_quantizer", None)
        self.wspec: QuantizerSpec | None = wq.spec if wq is not None else None
        self.ispec: QuantizerSpec | None = iq.spec if iq is not None else None

    def full_mask(self) -> torch.Tensor | None:
        """A sparse layer's mask in the weight's full TP=1 layout (None for dense layers)."""
        mask = getattr(self.module, "sparse_mask", None)
        if mask is None:
            return None
        return gather_input_dim(self.module, mask) if self.row_parallel else gather_output_dim(self.module, mask)

    # -- the weight quantizer on the view ----------------------------------------------
    def weight_block(self) -> int:
        return weight_block_size(self.module)

    def weight_amax(self, w: torch.Tensor) -> torch.Tensor:
        """Max-calibrated amax of the full weight `w` (TP=1's quantizer buffer shape)."""
        fmt, gran = QFormat(self.wspec.format), Granularity(self.wspec.granularity)
        if fmt in NO_CALIBRATION:
            return torch.zeros(())
        if fmt == QFormat.nvfp4 or gran == Granularity.tensor:
            return w.abs().amax()
        if gran == Granularity.channel:
            return w.abs().amax(dim=1, keepdim=True)
        return to_blocks(w, self.wspec.effective_block_size()).abs().amax(dim=-1)

    def quant_weight(self, w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
        return fake_quant(w, self.wspec, amax)

    def amax_per_column(self, amax: torch.Tensor) -> torch.Tensor:
        """[rows, in] amax of every weight element (what GPTQ quantizes a column with)."""
        rows, cols = self.weight.shape
        if amax.ndim == 0 or Granularity(self.wspec.granularity) == Granularity.channel:
            return amax.expand(rows, cols)
        return amax[:, torch.arange(cols) // self.weight_block()]

    # -- the input quantizer on the view -----------------------------------------------
    def quant_input(self, x: torch.Tensor, channel_absmax: torch.Tensor) -> torch.Tensor:
        """Fake-quantize inputs as a max-calibrated per-tensor input quantizer would."""
        if self.ispec is None:
            return x
        return fake_quant(x, self.ispec, channel_absmax.max())

    # -- results: this rank's share -------------------------------------------------------
    def local_columns(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the last (input) dim: of the weight's columns, or of anything laid
        out along them in whole pieces (per-block scales of blocks that TP does not split)."""
        if not self.row_parallel or self.tp == 1:
            return t
        local = t.shape[-1] // self.tp
        start = local * _tp_rank(self.module)
        return t[..., start:start + local]

    def local_rows(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full [out, ...] tensor (column parallel; TP=1 row order in)."""
        return t if self.row_parallel else local_output_rows(self.module, t)

    def local_weight_amax(self, amax: torch.Tensor) -> torch.Tensor:
        """The weight quantizer's buffer on this rank: own rows of per-row / per-block amax of a
        column-parallel layer; row-parallel amax covers every (global) block on every rank."""
        return self.local_rows(amax) if amax.ndim == 2 else amax

    def local_share(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's part of a full tensor shaped like the weight (TP=1 layout in)."""
        return self.local_rows(self.local_columns(t))

    def write_weight(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.local_share(w).to(self.module.weight.dtype))


def local_output_rows(module: nn.Module, t: torch.Tensor, gated: bool | None = None) -> torch.Tensor:
    """This rank's rows of a column-parallel layer's full [out, ...] tensor (TP=1 row order in);
    `gated`: per-rank [gate_r; up_r] rows (default: what the module was tagged with)."""
    tp = tp_size_of(module)
    if tp == 1:
        return t
    rank = _tp_rank(module)
    gated = bool(getattr(module, "_nq_swiglu", False)) if gated is None else gated
    return fc1_rows_of_rank(t, rank, tp) if gated else t.chunk(tp, dim=0)[rank]


def _tp_rank(module: nn.Module) -> int:
    from megatron.core.utils import get_pg_rank

    return get_pg_rank(module.tp_group)


# Norms whose output feeds exactly one fused linear layer: (sub-block, linear) -> norm.
_FOLDABLE = {("self_attention", "linear_qkv"): "input_layernorm", ("mlp", "linear_fc1"): "pre_mlp_layernorm"}


def preceding_norm(model: nn.Module, name: str) -> nn.Module | None:
    """The norm a pre-quant scale of `name` can be folded into, or None.

    Folding is exact when the norm's output is read by this layer alone: q/k/v (one fused
    linear_qkv) after input_layernorm, gate/up (one fused linear_fc1) after pre_mlp_layernorm,
    but not in MoE layers (the router reads the norm too) and not with zero-centred gamma."""
    parent, _, leaf = name.rpartition(".")
    layer_name, _, block = parent.rpartition(".")
    norm_name = _FOLDABLE.get((block, leaf))
    if norm_name is None or not layer_name:
        return None
    layer = model.get_submodule(layer_name)
    if block == "mlp" and type(getattr(layer, "mlp", None)).__name__ != "MLP":
        return None
    if getattr(getattr(layer, "config", None), "layernorm_zero_centered_gamma", False):
        return None
    norm = getattr(layer, norm_name, None)
    weight = getattr(norm, "weight", None)
    return norm if isinstance(weight, torch.Tensor) and weight.ndim == 1 else None


def apply_pre_quant_scale(model: nn.Module, view: LinearView, scale: torch.Tensor) -> str:
    """Make the layer compute Q(x * scale) @ Q(W / scale)^T. Returns where the scale went."""
    module = view.module
    with torch.no_grad():
        view.write_weight(view.weight / scale)
        norm = None if view.row_parallel else preceding_norm(model, view.name)
        if norm is not None and norm.weight.shape[0] == scale.shape[0]:
            norm.weight.mul_(scale.to(norm.weight.dtype))
            if getattr(norm, "bias", None) is not None:
                norm.bias.mul_(scale.to(norm.bias.dtype))
            return "norm"
        module.pre_quant_scale.copy_(view.local_columns(scale))
        return "pre_quant_scale"
