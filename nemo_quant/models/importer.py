"""Load a weight source into this rank's shard of a Megatron GPTModel."""
from __future__ import annotations

from functools import lru_cache

import torch

from nemo_quant.models.arch import padded_vocab_size
from nemo_quant.models.megatron_layout import megatron_tensor
from nemo_quant.models.sources import WeightSource


def import_weights(model: torch.nn.Module, source: WeightSource) -> None:
    """Fill every parameter of `model` from `source`; a parameter with no source is an error."""
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    arch = source.arch
    get = lru_cache(maxsize=4)(source.get)  # q/k/v and gate/up are read once per layer
    layer_numbers = {i: layer.layer_number - 1 for i, layer in enumerate(model.decoder.layers)}
    padded = padded_vocab_size(arch.vocab_size, tp)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = megatron_tensor(name, get, arch, tp_rank, tp, layer_numbers.__getitem__, padded)
            if value.shape != param.shape:
                raise ValueError(
                    f"{name}: source gives shape {tuple(value.shape)}, model expects {tuple(param.shape)}; "
                    "the model config and the checkpoint disagree."
                )
            param.copy_(value.to(param.dtype))
