"""Statistics pass of the calibration algorithms: what each quantized linear layer's GEMM sees.

The model runs unquantized (every quantizer bypassed) while observers record, per layer and
over the layer's *whole* input dim:
- per-channel max |x| and mean |x| (SmoothQuant and AWQ scales),
- every `token_stride`-th token row (output error of the scale searches),
- the block-diagonal of X^T X (AWQ clip search; exact error of a block's rounding),
- the full X^T X (GPTQ).
Row-parallel layers see only their slice of the input at TP > 1, so their observer gathers
the slices over the TP group: statistics then equal TP=1's on every rank. Data-parallel
ranks merge theirs after the pass (max / sum); token samples stay local, and the searches
sum their errors over DP instead.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nemo_quant.distributed import dp_all_reduce, tp_all_gather
from nemo_quant.numerics.blocks import num_blocks, to_blocks


@dataclass(frozen=True)
class Needs:
    samples: bool = False
    block_hessian: bool = False
    hessian: bool = False
    token_stride: int = 16

    def bytes_for(self, in_features: int, est_samples: int) -> int:
        total = 3 * in_features * 8
        if self.samples:
            total += est_samples * in_features * 4
        if self.block_hessian:
            total += in_features * min(in_features, 128) * 4
        if self.hessian:
            total += in_features ** 2 * 8  # float64 sum
        return total


def tp_size_of(module: nn.Module) -> int:
    group = getattr(module, "tp_group", None)
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def is_row_parallel(module: nn.Module) -> bool:
    return getattr(module, "_nq_weight_tp_axis", None) == 1


def weight_block_size(module: nn.Module) -> int:
    """Input columns that share one weight scale (a whole row for tensor / channel scales)."""
    from nemo_quant.quantization.config import BLOCK_ONLY, Granularity, QFormat

    spec = module.weight_quantizer.spec
    if Granularity(spec.granularity) == Granularity.block or QFormat(spec.format) in BLOCK_ONLY:
        return spec.effective_block_size()
    return module.input_size


def gather_input_dim(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Row-parallel input slices -> the whole input dim (identity at TP=1 or column parallel)."""
    if not is_row_parallel(module) or tp_size_of(module) == 1:
        return x
    return tp_all_gather(x, dim=-1)


def gather_output_dim(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """Column-parallel rows of all ranks in TP=1's row order (gated fc1's per-rank [gate_r; up_r]
    put back as [gate; up]); identity at TP=1."""
    from nemo_quant.models.megatron_layout import fc1_rows_in_tp1_order

    tp = tp_size_of(module)
    if tp == 1:
        return t
    full = tp_all_gather(t, dim=0)
    return fc1_rows_in_tp1_order(full, tp) if getattr(module, "_nq_swiglu", False) else full


class LinearObserver:
    """Accumulates one layer's statistics; every tensor exists from the start so that a rank
    that sees no data still joins the DP reductions with neutral values."""

    def __init__(self, module: nn.Module, needs: Needs):
        self.module, self.needs = module, needs
        n = module.input_size
        self.absmax = torch.zeros(n)
        self.abssum = torch.zeros(n, dtype=torch.float64)
        self.count = torch.zeros(1, dtype=torch.float64)
        self.samples: list[torch.Tensor] = []
        self.block_size = weight_block_size(module) if needs.block_hessian else n
        bs = self.block_size
        self.block_hessian = torch.zeros(num_blocks(n, bs), bs, bs) if needs.block_hessian else None
        # float64 sum of each batch's float32 X^T X: every batch's product is computed exactly as
        # at TP=1, and float64 adds float32 values exactly unless they span more than ~2^29 in
        # magnitude, so the sum and its DP all-reduce do not depend on which rank saw which batch.
        self.hessian = torch.zeros(n, n, dtype=torch.float64) if needs.hessian else None

    def __call__(self, x: torch.Tensor) -> None:
        with torch.no_grad():
            full = gather_input_dim(self.module, x.detach())
            rows = full.reshape(-1, full.shape[-1]).float()
            self.absmax = torch.maximum(self.absmax, rows.abs().amax(dim=0))
            self.abssum += rows.abs().sum(dim=0, dtype=torch.float64)
            self.count += rows.shape[0]
            if self.needs.samples:
                self.samples.append(rows[:: self.needs.token_stride].clone())
            if self.block_hessian is not None:
                xb = to_blocks(rows, self.block_size).transpose(0, 1)  # [blocks, tokens, bs]
                self.block_hessian += xb.transpose(1, 2) @ xb
            if self.hessian is not None:
                self.hessian += (rows.T @ rows).double()

    def merge_data_parallel(self) -> None:
        dp_all_reduce(self.absmax, "max")
        dp_all_reduce(self.abssum, "sum")
        dp_all_reduce(self.count, "sum")
        for t in (self.block_hessian, self.hessian):
            if t is not None:
                dp_all_reduce(t, "sum")

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / self.count.clamp(min=1)).float()

    def sample_rows(self) -> torch.Tensor:
        n = self.module.input_size
        return torch.cat(self.samples) if self.samples else torch.zeros(0, n)


class observing:
    """Context: a LinearObserver attached to each of `layers` (name -> observer on entry)."""

    def __init__(self, layers: list[tuple[str, nn.Module]], needs: Needs):
        self.layers, self.needs = layers, needs
        self.observers: dict[str, LinearObserver] = {}

    def __enter__(self) -> dict[str, LinearObserver]:
        for name, module in self.layers:
            self.observers[name] = module._nq_observer = LinearObserver(module, self.needs)
        return self.observers

    def __exit__(self, *exc) -> None:
        for _, module in self.layers:
            module._nq_observer = None


class bypassed_quantizers:
    """Context: every TensorQuantizer of `model` (or those whose name ends with one of `suffixes`,
    e.g. "input_quantizer") passes its input through unchanged."""

    def __init__(self, model: nn.Module, suffixes: tuple[str, ...] = ("",)):
        from nemo_quant.quantization.modules import quantizers

        self.quantizers = [q for name, q in quantizers(model) if name.endswith(suffixes)]

    def __enter__(self):
        for q in self.quantizers:
            q.bypass = True

    def __exit__(self, *exc):
        for q in self.quantizers:
            q.bypass = False
