"""The export driver: checks first (on every rank, before any byte is written), then one
streaming pass over the model feeding every requested format writer, inside a staging
directory that becomes `export.path` only when everything is written."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_quant.checkpoint.atomic import atomic_directory
from nemo_quant.distributed import any_rank, gather_messages
from nemo_quant.export.config import ExportConfig, ExportTarget, as_export_config
from nemo_quant.export.formats import ExportError, ExportFormat
from nemo_quant.export.gather import layer_specs, stream_model
from nemo_quant.export.hf import HFWriter
from nemo_quant.export.hf_layout import SPLITS, check_kv_spec, check_pre_quant_scale, convert_layer, linear_format
from nemo_quant.export.quant_summary import QuantSummary
from nemo_quant.export.trtllm import TRTLLMWriter, check_architecture, check_layout
from nemo_quant.models.arch import LlamaArch
from nemo_quant.models.loading import DTYPES
from nemo_quant.qlora.export import qlora_export_problem, qlora_writers
from nemo_quant.runtime.distributed_init import is_main_rank
from nemo_quant.utils.progress import progress


@dataclass
class ExportResult:
    path: Path
    files: list[Path] = field(default_factory=list)
    bytes_written: int = 0
    seconds: float = 0.0
    quant_algo: str | None = None


def _producer() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("nemo_quant")
    except PackageNotFoundError:
        v = "unknown"
    return {"name": "nemo_quant", "version": v}


_FROM_MODEL = object()


def _qlora_of(model):
    from nemo_quant.modes import mode_config

    return mode_config(model, "qlora")


def export_problems(model, arch: LlamaArch, cfg: ExportConfig, specs_of=layer_specs, smoothing: bool = False,
                    qlora_cfg=_FROM_MODEL) -> str | None:
    """The first reason this rank's layers cannot be written as `cfg` asks, or None.
    `specs_of(layer)` gives each linear's (weight, input) specs and the KV spec: the quantizers'
    own by default, or those a configured quantize mode will attach (the preflight, before any
    work); `smoothing`: that mode's algorithm writes pre-quant scales; `qlora_cfg`: the qlora
    config the model has (default: read from the model) or will have."""
    try:
        if cfg.path is None:
            raise ExportError("export.path is not set; give the directory to write (export.path=/path/to/ckpt).")
        if cfg.max_shard_size_gb <= 0:
            raise ExportError(f"export.max_shard_size_gb={cfg.max_shard_size_gb}: must be positive.")
        from nemo_quant.speculative.jobs import heads_config

        if cfg.format == ExportTarget.draft:
            from nemo_quant.speculative.export import draft_problem

            return draft_problem(heads_config(model))
        qlora = _qlora_of(model) if qlora_cfg is _FROM_MODEL else qlora_cfg
        problem = qlora_export_problem(cfg, qlora)
        if problem or qlora is not None:
            return problem
        if cfg.format in (ExportTarget.trtllm, ExportTarget.both):
            check_architecture(cfg.trtllm_architecture)
            check_layout(arch, cfg.inference_tp, cfg.inference_pp)
        trt_tp = cfg.inference_tp if cfg.format != ExportTarget.hf else 1
        for layer in model.decoder.layers:
            where = f"decoder.layers.{layer.layer_number - 1}"
            specs, kv = specs_of(layer)
            for name, projs in SPLITS.items():
                module = layer.get_submodule(name)
                fmt, group = linear_format(specs.get(name, (None, None)), module.input_size, f"{where}.{name}")
                if group and module.input_size // trt_tp % group and name.endswith(("linear_proj", "linear_fc2")):
                    raise ExportError(f"{where}.{name}: export.inference_tp={trt_tp} splits its input dim "
                                      f"{module.input_size} into pieces that are not multiples of the group size {group}.")
                fused = len(projs) > 1  # smoothing scales of fused layers are folded into the norm before them
                pqs = getattr(module, "pre_quant_scale", None)
                check_pre_quant_scale(fmt, pqs, fused, f"{where}.{name}", planned=smoothing and not fused)
                if cfg.format == ExportTarget.compressed_tensors:
                    check_compressed_tensors(fmt, group, pqs, fused, smoothing, f"{where}.{name}")
            if kv is not None:
                check_kv_spec(kv, where)
        head = getattr(model, "output_layer", None)
        if head is not None and any(specs_of(head)[0].get("", (None, None))):
            raise ExportError("the output layer is quantized; keep '*output_layer*' in quant.exclude to export "
                              "(checkpoint formats keep lm_head in high precision).")
    except ExportError as e:
        return str(e)
    return None


def check_compressed_tensors(fmt, group: int, pqs, fused: bool, smoothing: bool, where: str) -> None:
    """A compressed-tensors layout exists for the format, and no smoothing scale is left on the layer."""
    from nemo_quant.export.compressed_tensors import ct_scheme

    if fmt != ExportFormat.none:
        ct_scheme(fmt, group, where)
    if fused:
        return
    if smoothing or (pqs is not None and not bool((pqs == 1).all())):
        raise ExportError(f"{where}: export.format=compressed_tensors has no pre-quant scale, but this layer's "
                          "smoothing scale (SmoothQuant/AWQ) would stay on it; set quant.search.fold_all_scales=true "
                          "to fold o_proj's scale into v_proj and down_proj's into up_proj, or use export.format=hf.")


def preflight(model, arch: LlamaArch, cfg: ExportConfig) -> None:
    """Every check that can fail, on every rank's own layers; raises the same error everywhere."""
    problems = [m for m in gather_messages(export_problems(model, arch, cfg)) if m]
    if problems:
        raise ExportError(problems[0])


def export_checkpoint(model, arch: LlamaArch, cfg: ExportConfig, tokenizer=None) -> ExportResult:
    """Write `cfg.format` to `cfg.path`; every rank of the model calls this."""
    from nemo_quant.speculative.jobs import heads_config

    cfg = as_export_config(cfg)
    preflight(model, arch, cfg)
    dtype = DTYPES[getattr(cfg.dtype, "value", cfg.dtype)]
    start = time.perf_counter()
    result = ExportResult(Path(cfg.path).expanduser().resolve())
    heads = heads_config(model)
    if cfg.format == ExportTarget.draft:
        from nemo_quant.speculative.export import write_draft

        result.files = write_draft(model, arch, cfg, heads)
        result.seconds = time.perf_counter() - start
        if is_main_rank():
            result.bytes_written = sum(f.stat().st_size for f in result.files)
        return result
    medusa = _medusa_for_trtllm(model, arch, cfg, heads, dtype)
    summary = QuantSummary()
    summary.sparsity = _sparsity_of(model)
    if summary.sparsity is not None:
        from nemo_quant.sparsity.modules import mask_problems

        problems = [p for p in gather_messages(mask_problems(model, summary.sparsity["n"], summary.sparsity["m"])) if p]
        if problems:
            raise ExportError(problems[0])
    qlora = _qlora_of(model)
    with atomic_directory(result.path, cfg.overwrite, key="export.path") as staging:
        writers = {}
        if is_main_rank():
            writers = qlora_writers(staging, arch, dtype, cfg, qlora) if qlora else _writers(staging, arch, dtype, cfg)
            if medusa is not None and "trtllm" in writers:
                writers["trtllm"].add_medusa(*medusa)
        stream = stream_model(model, arch.vocab_size)
        failure = None
        try:
            _consume(stream, writers, summary, arch, qlora is not None)
            for name, w in writers.items():
                result.files += w.finish(summary, _producer()) if name == "trtllm" else w.finish(summary, tokenizer, _producer())
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
            for w in writers.values():
                w.abort()
            for _ in stream:  # let the other stages finish sending, so that every rank reaches the agreement
                pass
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
        # One rank failing (a full disk on the writer) fails the export on all of them, promptly.
        if any_rank(failure is not None):
            raise failure or ExportError("the export failed on the writing rank (see its error); nothing was written "
                                         "to export.path.")
    result.seconds = time.perf_counter() - start
    result.quant_algo = summary.quant_algo if is_main_rank() else None
    if is_main_rank() and qlora is not None and cfg.format == ExportTarget.peft and \
            getattr(qlora.base_format, "value", qlora.base_format) == "nf4":
        result.quant_algo = "NF4 (bitsandbytes, double quantization)"
    if is_main_rank():
        result.files = [result.path / f.relative_to(staging) for f in result.files]
        result.bytes_written = sum(f.stat().st_size for f in result.path.rglob("*") if f.is_file())
    return result


def _medusa_for_trtllm(model, arch: LlamaArch, cfg: ExportConfig, heads, dtype):
    """(tensors, heads, layers) of Medusa heads for the TensorRT-LLM checkpoint (gathered on every
    rank; collective), or None; heads of other methods are not part of an hf/trtllm export (say so)."""
    if heads is None:
        return None
    from nemo_quant.speculative.config import Method

    if Method(heads.method) != Method.medusa or cfg.format not in (ExportTarget.trtllm, ExportTarget.both):
        if is_main_rank():
            print(f"[nemo_quant] export.format={cfg.format.value} writes the base model; its {heads.method.value} "
                  "heads are written by export.format=draft.", flush=True)
        return None
    from nemo_quant.export.gather import gather_module
    from nemo_quant.speculative.export import medusa_trtllm_tensors
    from nemo_quant.speculative.mode import ATTR

    tensors = medusa_trtllm_tensors(gather_module(getattr(model, ATTR)), heads, arch, dtype)
    return tensors, heads.num_heads, heads.head_layers


def _sparsity_of(model) -> dict | None:
    from nemo_quant.modes import mode_config

    cfg = mode_config(model, "sparsity")
    return None if cfg is None else {"n": cfg.n, "m": cfg.m, "method": getattr(cfg.method, "value", cfg.method)}


def _consume(stream, writers: dict, summary: QuantSummary, arch: LlamaArch, qlora: bool = False) -> None:
    from nemo_quant.qlora.hf_export import convert_qlora_layer

    bar = progress(arch.num_layers, "export", unit="layer")
    for kind, item in stream:
        if kind == "layer":
            if qlora:
                item = convert_qlora_layer(item, arch)
            else:
                item = convert_layer(item, arch)
                summary.add(item)
            bar.update(1)
        for w in writers.values():
            if kind == "head":
                w.head(*item)
            else:
                getattr(w, kind)(item)
    bar.close()


def _writers(staging: Path, arch: LlamaArch, dtype: torch.dtype, cfg: ExportConfig) -> dict:
    both = cfg.format == ExportTarget.both
    writers = {}
    if cfg.format in (ExportTarget.hf, ExportTarget.both):
        writers["hf"] = HFWriter(staging / "hf" if both else staging, arch, dtype, int(cfg.max_shard_size_gb * 2**30))
    if cfg.format == ExportTarget.compressed_tensors:
        from nemo_quant.export.compressed_tensors import CompressedTensorsWriter

        writers["hf"] = CompressedTensorsWriter(staging, arch, dtype, int(cfg.max_shard_size_gb * 2**30))
    if cfg.format in (ExportTarget.trtllm, ExportTarget.both):
        writers["trtllm"] = TRTLLMWriter(staging / "trtllm" if both else staging, arch, dtype, cfg.inference_tp,
                                         cfg.inference_pp, cfg.trtllm_architecture)
    return writers
