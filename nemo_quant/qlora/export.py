"""Which QLoRA exports a job may write, and their writers (the export driver is export/writer.py).

export.format=peft   -> <path>/base (bitsandbytes NF4, or the plain base of a LoRA) and
                        <path>/adapter (PEFT), loaded as PeftModel.from_pretrained(base, adapter)
export.format=merged -> <path>: dequant(W) + scaling * B A in export.dtype, a plain HF checkpoint
                        that `nemo-quant ptq quant=... model.path=<path>` quantizes next.
Re-quantizing a merge to NF4 erases most of the adapter (its update is far below one NF4 step),
so no export writes an NF4 merge; the merged export measures and logs how much of it would be lost
(`hf_export.MergedWriter.nf4_update_loss`).
"""
from __future__ import annotations

from pathlib import Path

import torch

from nemo_quant.export.config import ExportConfig, ExportTarget
from nemo_quant.models.arch import LlamaArch

QLORA_TARGETS = (ExportTarget.peft, ExportTarget.merged)


def qlora_export_problem(cfg: ExportConfig, qlora_cfg) -> str | None:
    """Why `cfg` cannot export a model with (or without, qlora_cfg None) the qlora mode."""
    fmt = ExportTarget(cfg.format)
    if qlora_cfg is None:
        if fmt in QLORA_TARGETS:
            return (f"export.format={fmt.value} writes LoRA adapters, and this model has none; train with qlora=nf4 "
                    "(or qlora=lora) first, or choose export.format=hf.")
        return None
    if fmt not in QLORA_TARGETS:
        return (f"export.format={fmt.value} would drop the model's LoRA adapters (qlora={qlora_cfg.name}); use "
                "export.format=peft (the base as bitsandbytes NF4 + a PEFT adapter) or export.format=merged "
                "(dequant(W) + scaling * B A, to quantize next with `nemo-quant ptq model.path=<merged>`).")
    return None


def qlora_writers(staging: Path, arch: LlamaArch, dtype: torch.dtype, cfg: ExportConfig, qlora_cfg) -> dict:
    from nemo_quant.qlora.config import BaseFormat
    from nemo_quant.qlora.hf_export import BnbNF4Writer, MergedWriter, PeftWriter

    shard = int(cfg.max_shard_size_gb * 2**30)
    if ExportTarget(cfg.format) == ExportTarget.merged:
        return {"merged": MergedWriter(staging, arch, dtype, shard, scaling=qlora_cfg.scaling)}
    nf4 = BaseFormat(qlora_cfg.base_format) == BaseFormat.nf4
    return {"base": BnbNF4Writer(staging / "base", arch, dtype, shard, nf4=nf4),
            "adapter": PeftWriter(staging / "adapter", qlora_cfg, base_path="../base")}
