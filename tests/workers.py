"""Functions run inside spawned ranks (module-level so the spawn context can import them)."""
from __future__ import annotations

import torch


def sharded_logits(model_path: str, tp: int, pp: int, tokens: torch.Tensor):
    """Load `model_path` at TP x PP and return the full-vocab logits from the last stage."""
    from megatron.core import parallel_state as ps

    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.runtime.pipeline import forward_batches, gather_vocab_logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    out = forward_batches(loaded.model, [tokens], lambda o, t: gather_vocab_logits(o, loaded.vocab_size), 1)
    return out[0] if ps.is_pipeline_last_stage() else None


def sharded_perplexity(model_path: str, tp: int, pp: int, windows: torch.Tensor) -> float:
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    return perplexity(loaded.model, windows, loaded.vocab_size).perplexity


def greedy_continuation(model_path: str, prompt: str, steps: int) -> str:
    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.runtime.pipeline import forward_batches, gather_vocab_logits

    init_megatron(ParallelLayout(1, 1), timeout_s=120)
    loaded = load_model(model_path)
    ids = loaded.tokenizer.encode(prompt).ids
    for _ in range(steps):
        tokens = torch.tensor([ids])
        logits = forward_batches(loaded.model, [tokens], lambda o, t: gather_vocab_logits(o, loaded.vocab_size), 1)[0]
        ids.append(int(logits[0, -1].argmax()))
    return loaded.tokenizer.decode(ids)


def raise_on_rank(bad_rank: int) -> int:
    import torch.distributed as dist

    if dist.get_rank() == bad_rank:
        raise RuntimeError(f"deliberate failure on rank {bad_rank}")
    dist.barrier()  # the healthy ranks wait here; the parent must not hang on them
    return dist.get_rank()


def hang_forever() -> None:
    import time

    time.sleep(3600)


def world_info() -> tuple[int, int]:
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return dist.get_rank(), int(t.item())


def quantized_logits(model_path: str, tp: int, quant_cfg: dict, calib: torch.Tensor, evals: torch.Tensor, save_dir: str | None = None):
    """PTQ at TP=tp: returns (last-stage logits, gathered weight amax of one row-parallel layer)."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.quant_helpers import logits, loop_over

    init_megatron(ParallelLayout(tp, 1), timeout_s=120)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("quantize", quant_cfg)])
    calibrate(loaded.model, loop_over(calib))
    if save_dir is not None:
        from nemo_quant.checkpoint.model_checkpoint import save_model

        save_model(loaded.model, loaded.source.arch, save_dir)
    proj = loaded.model.decoder.layers[1].self_attention.linear_proj
    return logits(loaded.model, evals), (proj.input_quantizer.amax.clone() if getattr(proj, "input_quantizer", None) is not None else None)


def restored_logits(checkpoint: str, tp: int, evals: torch.Tensor, pp: int = 1):
    from nemo_quant.checkpoint.model_checkpoint import load_model_checkpoint
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.quant_helpers import logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    return logits(load_model_checkpoint(checkpoint), evals)


def qat_run(model_path: str, save_dir: str, steps: int, quant_cfg: dict | None, windows: torch.Tensor, lr: float = 1e-3,
            pp: int = 1):
    """Train (or resume) to `steps`; returns (losses, an amax snapshot before and after)."""
    from pathlib import Path

    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.modules import quantizers
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.training.loop import TrainState, latest_checkpoint, make_optimizer, resume, train
    from tests.quant_helpers import loop_over

    init_megatron(ParallelLayout(1, pp), timeout_s=120)
    previous = latest_checkpoint(save_dir)
    loaded = load_model(model_path, with_weights=previous is None)
    optimizer = None
    if previous is not None:
        optimizer, state = resume(loaded.model, lambda m: make_optimizer(m, lr, 0.0), previous)
    else:
        apply_modes(loaded.model, [("quantize", quant_cfg)])
        calibrate(loaded.model, loop_over(windows[:2, :-1]))
        optimizer = make_optimizer(loaded.model, lr, 0.0)
        state = TrainState()
    before = {n: q.amax.clone() for n, q in quantizers(loaded.model)}
    state = train(loaded.model, loaded.source.arch, optimizer, windows, state, steps, 2, Path(save_dir), save_every=5)
    after = {n: q.amax.clone() for n, q in quantizers(loaded.model)}
    return state.losses, before, after, state.step


def calibrate_layout(model_path: str, tp: int, pp: int, quant_cfg: dict, calib: torch.Tensor, evals: torch.Tensor,
                     save_dir: str | None = None):
    """PTQ at TP x PP (x DP = the rest) with the windows loop; returns last-stage logits + amax by name."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.quantization.modules import quantizers
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.quant_helpers import logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("quantize", quant_cfg)])
    calibrate(loaded.model, windows_forward_loop(calib))
    if save_dir is not None:
        from nemo_quant.checkpoint.model_checkpoint import save_model

        save_model(loaded.model, loaded.source.arch, save_dir)
    offset = loaded.model.decoder.layers[0].layer_number - 1  # name layers globally under PP
    amax = {}
    for name, q in quantizers(loaded.model):
        parts = name.split(".")
        if parts[:2] == ["decoder", "layers"]:
            parts[2] = str(int(parts[2]) + offset)
        amax[".".join(parts)] = q.amax.clone()
    return logits(loaded.model, evals), amax


def failing_calibration(bad_rank: int) -> str:
    """Rank `bad_rank` raises inside its forward loop; every rank reports what it got."""
    import torch.distributed as dist

    from nemo_quant.models.builder import build_gpt_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.quant_helpers import INT8_CHANNEL, loop_over, tokens
    from tests.tiny_models import TINY

    init_megatron(ParallelLayout(1, 1), timeout_s=60)
    model = build_gpt_model(TINY)
    apply_modes(model, [("quantize", INT8_CHANNEL)])

    def loop(m):
        if dist.get_rank() == bad_rank:
            raise ValueError("corrupt calibration shard")
        loop_over(tokens(1))(m)

    try:
        calibrate(model, loop)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def algorithm_layout(model_path: str, tp: int, pp: int, quant_cfg: dict, calib: torch.Tensor, evals: torch.Tensor):
    """PTQ with an algorithm at TP x PP (x DP): last-stage logits and the quantizer state that
    the algorithm decided, gathered to TP=1's layout and named globally (PP)."""
    import torch.distributed as dist

    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.quant_helpers import logits

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("quantize", quant_cfg)])
    calibrate(loaded.model, windows_forward_loop(calib))
    offset = loaded.model.decoder.layers[0].layer_number - 1
    state = {}
    for name, tensor in loaded.model.state_dict().items():
        if not isinstance(tensor, torch.Tensor) or not name.startswith("decoder.layers."):
            continue
        if not (name.endswith("_amax") or name.endswith("pre_quant_scale") or "layernorm" in name):
            continue
        module = loaded.model.get_submodule(name.rsplit(".", 2 if "quantizer" in name else 1)[0])
        axis = getattr(module, "_nq_weight_tp_axis", None)
        if tp > 1 and axis is not None and tensor.ndim > 0 and (
                (axis == 1 and name.endswith("pre_quant_scale")) or (axis == 0 and "weight_quantizer" in name)):
            from nemo_quant.models.megatron_layout import fc1_rows_in_tp1_order

            parts = [torch.empty_like(tensor) for _ in range(tp)]
            dist.all_gather(parts, tensor.contiguous(), group=module.tp_group)
            tensor = torch.cat(parts, dim=0)
            if name.endswith("linear_fc1.weight_quantizer._amax"):  # per rank [gate_r; up_r] -> [gate; up]
                tensor = fc1_rows_in_tp1_order(tensor, tp)
        bits = name.split(".")
        bits[2] = str(int(bits[2]) + offset)
        state[".".join(bits)] = tensor.clone()
    return logits(loaded.model, evals), state


def batch_percentile_amax(batches_per_rank: list[list[float]], percentile: float) -> float:
    """Each DP rank feeds its own batches (given as their maxima) to a batch_percentile input quantizer."""
    import torch.distributed as dist

    from nemo_quant.quantization.config import QuantizerSpec
    from nemo_quant.quantization.tensor_quantizer import TensorQuantizer
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(1, 1), timeout_s=60)
    q = TensorQuantizer(QuantizerSpec(format="int8", calibrator="batch_percentile", percentile=percentile), "input")
    q.start_calibration()
    for peak in batches_per_rank[dist.get_rank()]:
        q(torch.tensor([0.5, -peak, 0.25]))
    return float(q.local_amax())


def export_checkpoint_at(checkpoint: str, tp: int, pp: int, out_dir: str, fmt: str = "both", inference_tp: int = 2,
                         inference_pp: int = 1) -> None:
    """Load a nemo_quant checkpoint at TP x PP (x DP = the rest of the world) and export it."""
    from nemo_quant.checkpoint.model_checkpoint import load_model_checkpoint, read_arch
    from nemo_quant.export import ExportConfig, export_checkpoint
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    model = load_model_checkpoint(checkpoint)
    export_checkpoint(model, read_arch(checkpoint),
                      ExportConfig(format=fmt, path=out_dir, dtype="float32", inference_tp=inference_tp,
                                   inference_pp=inference_pp))


def export_failing_on_rank0(checkpoint: str, tp: int, pp: int, out_dir: str, fail_at_layer: int) -> None:
    """Export where rank 0's HF writer fails (a full disk) after `fail_at_layer` layers."""
    from nemo_quant.export.hf import HFWriter

    original, calls = HFWriter.layer, {"n": 0}

    def failing(self, layer):  # only rank 0 writes, so only rank 0 ever calls it
        calls["n"] += 1
        if calls["n"] > fail_at_layer:
            raise OSError("No space left on device (injected)")
        return original(self, layer)

    HFWriter.layer = failing
    export_checkpoint_at(checkpoint, tp, pp, out_dir, "hf", 1)


def preflight_message(model_path: str, tp: int, pp: int, quant_cfg: dict, export_cfg: dict) -> str | None:
    """Run the preflight at TP x PP; the message every rank raised (None if it passed)."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.preflight import PreflightError, preflight
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    try:
        preflight(loaded.model, loaded.source.arch, [("quantize", quant_cfg)], export_cfg)
    except PreflightError as e:
        return str(e)
    return None


def layout_export_digests(model_path: str, tp: int, pp: int, threads: int, presets: dict, calib: torch.Tensor,
                          out_root: str) -> dict:
    """PTQ + HF export of every preset at TP x PP on `threads` threads each; rank 0 returns
    {preset: {"files": {file: sha256}, "plan": auto plan overrides or None, "seconds": ...}}."""
    import hashlib
    import shutil
    import time
    from pathlib import Path

    from nemo_quant.export import ExportConfig, export_checkpoint
    from nemo_quant.models.builder import build_gpt_model
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.quantization.mixed_precision import auto_plan
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron, is_main_rank

    torch.set_num_threads(threads)
    init_megatron(ParallelLayout(tp, pp), timeout_s=300)
    loaded = load_model(model_path)
    arch = loaded.source.arch
    pristine = {k: v.clone() for k, v in loaded.model.state_dict().items() if v is not None}
    digests = {}
    for name, qcfg in presets.items():
        start = time.perf_counter()
        model = build_gpt_model(arch, torch.float32)  # a fresh shard per preset, same weights
        missing, unexpected = model.load_state_dict(pristine, strict=False)
        assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
        plan = None
        if qcfg.auto is not None:
            qcfg, _ = auto_plan(model, calib, qcfg)
            plan = [(o.pattern, o.weight.format.value if o.weight else None) for o in qcfg.overrides]
        apply_modes(model, [("quantize", qcfg)])
        calibrate(model, windows_forward_loop(calib))
        out = Path(out_root) / f"{name}_tp{tp}_pp{pp}"
        export_checkpoint(model, arch, ExportConfig(format="hf", path=str(out)))
        if is_main_rank():
            files = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(out.iterdir())
                     if f.suffix == ".safetensors" or f.name in ("hf_quant_config.json", "config.json")}
            digests[name] = {"files": files, "plan": plan, "seconds": time.perf_counter() - start}
            shutil.rmtree(out)
    return digests


def sparse_layout(model_path: str, tp: int, pp: int, sparsity_cfg: dict, calib: torch.Tensor,
                  save_dir: str | None = None, export_dir: str | None = None):
    """One-shot sparsity at TP x PP (x DP): every sparse layer's (weight, mask) in TP=1's layout,
    named globally, and the SHA-256 of each file of an HF export (rank 0) when asked."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.forward_loop import windows_forward_loop
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.sparsity import sparsify

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("sparsity", sparsity_cfg)])
    sparsify(loaded.model, windows_forward_loop(calib))
    if save_dir is not None:
        from nemo_quant.checkpoint.model_checkpoint import save_model

        save_model(loaded.model, loaded.source.arch, save_dir)
    digests = None
    if export_dir is not None:
        digests = _hf_export_digests(loaded, export_dir)
    return _sparse_state(loaded.model), digests


def _hf_export_digests(loaded, export_dir: str):
    import hashlib
    from pathlib import Path

    from nemo_quant.export.writer import export_checkpoint
    from nemo_quant.runtime.distributed_init import is_main_rank

    export_checkpoint(loaded.model, loaded.source.arch, {"format": "hf", "path": export_dir}, loaded.tokenizer)
    if not is_main_rank():
        return None
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(export_dir).iterdir())}


def _sparse_state(model):
    from nemo_quant.quantization.algorithms.linear_view import LinearView
    from nemo_quant.quantization.modules import global_name
    from nemo_quant.sparsity.modules import sparse_layers

    state = {}
    for local, module in sparse_layers(model):
        view = LinearView(local, module)
        state[global_name(model, local)] = (view.weight.clone(), view.full_mask().clone())
    return state


def restored_sparse_state(checkpoint: str, tp: int, pp: int = 1):
    """A sparse checkpoint loaded at TP x PP: (weight, mask) per layer in TP=1's layout."""
    from nemo_quant.checkpoint.model_checkpoint import load_model_checkpoint
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, pp), timeout_s=120)
    return _sparse_state(load_model_checkpoint(checkpoint))


def mode_preflight_message(model_path: str, tp: int, mode: str, cfg: dict) -> str | None:
    """The preflight's refusal of applying `mode` with `cfg` at TP=tp (None if it passes)."""
    from nemo_quant.models.loading import load_model
    from nemo_quant.preflight import PreflightError, preflight
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron

    init_megatron(ParallelLayout(tp, 1), timeout_s=120)
    loaded = load_model(model_path)
    try:
        preflight(loaded.model, loaded.source.arch, [(mode, cfg)])
    except PreflightError as e:
        return str(e)
    return None


def revived_weights_reload_message(model_path: str, ckpt: str) -> str:
    """Save a sparse model whose pruned weights were changed behind the mask, then load it."""
    from nemo_quant.checkpoint.model_checkpoint import load_model_checkpoint, save_model
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.sparsity import sparsify

    init_megatron(ParallelLayout(1, 1), timeout_s=120)
    loaded = load_model(model_path)
    apply_modes(loaded.model, [("sparsity", {"method": "magnitude"})])
    sparsify(loaded.model)
    layer = loaded.model.decoder.layers[2].self_attention.linear_proj
    with torch.no_grad():
        layer.weight[~layer.sparse_mask] = 0.5
    save_model(loaded.model, loaded.source.arch, ckpt)
    try:
        load_model_checkpoint(ckpt)
    except ValueError as e:
        return str(e)
    return "loaded"
