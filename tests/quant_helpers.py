"""Configs and forward helpers shared by the quantization tests."""
from __future__ import annotations

import torch

from nemo_quant.runtime.pipeline import forward_batches, gather_vocab_logits

W4A8_KV = {
    "name": "w4a8_kv", "weight": {"format": "int4", "granularity": "block", "block_size": 16},
    "input": {"format": "fp8_e4m3"}, "kv_cache": {"format": "fp8_e4m3"},
}
# Blocks of 32 over fc2's 96 inputs: at TP=2 each rank holds 48 columns, so block 1 straddles ranks.
INT4_BLOCK32_MSE = {"name": "int4_b32_mse", "weight": {"format": "int4", "granularity": "block", "block_size": 32, "calibrator": "mse"}}
INT8_CHANNEL = {"name": "int8_wo", "weight": {"format": "int8", "granularity": "channel"}, "input": {"format": "int8"}}


def tokens(seed: int = 0, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, batch: torch.Tensor, vocab: int = 257):
    out = forward_batches(model, [batch], lambda o, t: gather_vocab_logits(o, vocab), 1)
    return out[0] if out else None


def loop_over(*batches):
    def loop(model):
        for b in batches:
            forward_batches(model, [b], lambda o, t: None, 1)
    return loop

# The exportable formats, as the export tests quantize them (KV cache in FP8 where shown).
FP8_KV = {"name": "fp8", "weight": {"format": "fp8_e4m3"}, "input": {"format": "fp8_e4m3"},
          "kv_cache": {"format": "fp8_e4m3"}}
INT8_SQ = {"name": "sq", "algorithm": "smoothquant", "weight": {"format": "int8", "granularity": "channel"},
           "input": {"format": "int8"}}
NVFP4_KV = {"name": "nvfp4", "weight": {"format": "nvfp4", "granularity": "block"},
            "input": {"format": "nvfp4", "granularity": "block"}, "kv_cache": {"format": "fp8_e4m3"}}


def int4_awq(block: int, algorithm: str = "awq_lite") -> dict:
    return {"name": "awq", "algorithm": algorithm, "weight": {"format": "int4", "granularity": "block", "block_size": block}}


def w4a8_awq(block: int) -> dict:
    return {**int4_awq(block), "name": "w4a8", "input": {"format": "fp8_e4m3"}}
