"""Deployable checkpoints from (TP/PP-sharded) quantized Megatron models.

`export_checkpoint(model, arch, cfg, tokenizer)`: every rank calls it; rank 0 writes. The
model is streamed layer by layer (gather.py), each layer converted once to HF terms
(hf_layout.py) and handed to the format writers (hf.py, trtllm.py), all into a staging
directory renamed into place at the end (checkpoint/atomic.py).
"""
from __future__ import annotations

from nemo_quant.export.config import ExportConfig, ExportDType, ExportTarget
from nemo_quant.export.formats import ExportError
from nemo_quant.export.writer import ExportResult, export_checkpoint, preflight

__all__ = ["ExportConfig", "ExportDType", "ExportError", "ExportResult", "ExportTarget", "export_checkpoint", "preflight"]
