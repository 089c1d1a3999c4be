"""One quantized linear layer as the algorithms see it: its weight over the whole input dim.

Column-parallel layers hold every input column but only their share of the rows: searches
run on the local rows and reduce row statistics and errors over TP, so every rank picks the
same per-column scale. Row-parallel layers hold a slice of the input columns: the weight is
gathered and every rank runs the TP=1 computation, then keeps its own columns. Either way
the result equals TP=1's (DESIGN.md: "SmoothQuant/AWQ scale searches agree across TP").
"""
from __future__ import annotations

import torch
from torch import nn

from nemo_quant.distributed import tp_all_reduce
from nemo_quant.numerics.blocks import to_blocks
from nemo_quant.quantization.algorithms.observe import gather_input_dim, is_row_parallel, tp_size_of, weight_block_size
from nemo_quant.quantization.config import NO_CALIBRATION, Granularity, QFormat, QuantizerSpec
from nemo_quant.quantization.fake_quant import fake_quant


class LinearView:
    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        self.row_parallel = is_row_parallel(module)
        self.tp = tp_size_of(module)
        # A copy: the view must not alias the parameter it later writes back into.
        local = module.weight.detach().float().clone()
        self.weight = gather_input_dim(module, local) if self.row_parallel else local
        self.wspec: QuantizerSpec | None = module.weight_quantizer.spec if module.weight_quantizer is not None else None
        iq = module.input_quantizer
        self.ispec: QuantizerSpec | None = iq.spec if iq is not None else None
        # Rows are split over TP (column parallel): row statistics and errors span the group.
        self.rows_split = not self.row_parallel and self.tp > 1

    # -- TP reductions of row statistics -------------------------------------------------
    def sum_rows(self, t: torch.Tensor) -> torch.Tensor:
        return tp_all_reduce(t, "sum") if self.rows_split else t

    def max_rows(self, t: torch.Tensor) -> torch.Tensor:
        return tp_all_reduce(t, "max") if self.rows_split else t

    def total_rows(self) -> float:
        return float(self.sum_rows(torch.tensor(float(self.weight.shape[0]))))

    # -- the weight quantizer on the view ----------------------------------------------
    def weight_block(self) -> int:
        return weight_block_size(self.module)

    def weight_amax(self, w: torch.Tensor) -> torch.Tensor:
        """Max-calibrated amax of `w` shaped like the weight quantizer's buffer."""
        fmt, gran = QFormat(self.wspec.format), Granularity(self.wspec.granularity)
        if fmt in NO_CALIBRATION:
            return torch.zeros(())
        if fmt == QFormat.nvfp4 or gran == Granularity.tensor:
            return self.max_rows(w.abs().amax())
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

    # -- results ------------------------------------------------------------------------
    def local_columns(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of the last (input) dim."""
        if not self.row_parallel or self.tp == 1:
            return t
        local = self.module.input_size_per_partition
        start = local * _tp_rank(self.module)
        return t[..., start:start + local]

    def write_weight(self, w: torch.Tensor) -> None:
        with torch.no_grad():
            self.module.weight.copy_(self.local_columns(w).to(self.module.weight.dtype))


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
