"""`nemo-quant export`: write deployable checkpoints from a nemo_quant checkpoint (or from the
model itself, unquantized), at any inference TP/PP; also the export step of ptq/train."""
from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from nemo_quant.cli.commands.common import load_for_command, megatron_session, report, write_results


def export_step(cfg: DictConfig, loaded) -> dict:
    """Export the loaded (quantized) model as configured in `cfg.export`; every rank calls it."""
    from nemo_quant.export import export_checkpoint

    result = export_checkpoint(loaded.model, loaded.arch, OmegaConf.to_object(cfg.export), loaded.tokenizer)
    mb = result.bytes_written / 1e6
    summary = {"export": str(result.path), "export format": cfg.export.format.value,
               "export quant_algo": result.quant_algo or "none (high precision)",
               "export size": f"{mb:.1f} MB in {result.seconds:.2f} s ({mb / max(result.seconds, 1e-9):.1f} MB/s)"}
    report(summary)
    return {"export_path": str(result.path), "export_bytes": result.bytes_written, "export_s": result.seconds,
            "export_quant_algo": result.quant_algo}


def run_export(cfg: DictConfig) -> None:
    from nemo_quant.preflight import preflight

    with megatron_session(cfg):
        loaded = load_for_command(cfg)
        preflight(loaded.model, loaded.arch, [], cfg.export)
        write_results(export_step(cfg, loaded))
