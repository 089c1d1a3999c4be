"""The engine tier's cases: quantize + calibrate + export with nemo_quant (this process), serve the
export with vLLM (its own virtualenv, `vllm_driver.py` in a subprocess), score the same tokens
with our fake-quant model. Used by test_vllm_serves_exports.py and benchmarks/engine_agreement.py."""
from __future__ import annotations

import json
import math
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch

DRIVER = Path(__file__).with_name("vllm_driver.py")


@dataclass(frozen=True)
class Case:
    name: str
    preset: str | None  # conf/quant preset; None = unquantized
    export: str  # export.format
    overrides: dict = field(default_factory=dict)  # QuantConfig fields (dotted keys)
    kv_fp8: bool = False

    def quant_config(self):
        from omegaconf import OmegaConf

        from nemo_quant.quantization.config import QuantConfig, QuantizerSpec
        from nemo_quant.quantization.mixed_precision import load_preset

        cfg = OmegaConf.structured(load_preset(self.preset))
        for key, value in self.overrides.items():
            OmegaConf.update(cfg, key, value, merge=True)
        typed: QuantConfig = OmegaConf.to_object(cfg)
        if self.kv_fp8:
            typed.kv_cache = QuantizerSpec(format="fp8_e4m3", granularity="tensor")
        return typed


def vllm_python() -> str | None:
    return os.environ.get("NEMO_QUANT_VLLM_PYTHON")


def text_windows(tokenizer, text: str, count: int, length: int) -> torch.Tensor:
    from nemo_quant.data.windows import token_windows

    return token_windows(tokenizer.encode(text[:200_000], add_special_tokens=False).ids, count, length)


def build(case: Case, model_path: str | None, calib: torch.Tensor, out_dir: Path):
    """(fake-quant model in fp32, export directory) for `case`; Megatron TP=1 must be initialised."""
    from nemo_quant.export import ExportConfig, export_checkpoint
    from nemo_quant.models.loading import load_model
    from nemo_quant.modes import apply_modes
    from nemo_quant.quantization.calibrate import calibrate
    from nemo_quant.quantization.forward_loop import windows_forward_loop

    loaded = load_model(model_path)
    model = loaded.model
    if case.preset is not None:
        apply_modes(model, [("quantize", case.quant_config())])
        calibrate(model, windows_forward_loop(calib))
    export_checkpoint(model, loaded.source.arch, ExportConfig(format=case.export, path=str(out_dir),
                                                              overwrite=True), loaded.tokenizer)
    return model, loaded.source.arch


@torch.no_grad()
def our_scores(model, prompts: torch.Tensor, vocab: int, new_tokens: int) -> dict:
    """Prompt logprobs (token t given < t) and greedy continuations of our fake-quant model."""
    from tests.quant_helpers import logits

    logp = torch.log_softmax(logits(model, prompts, vocab).float(), dim=-1)
    prompt_lp = logp[:, :-1].gather(-1, prompts[:, 1:].unsqueeze(-1)).squeeze(-1)
    seqs, margins = prompts.clone(), []
    for _ in range(new_tokens):
        last = logits(model, seqs, vocab)[:, -1].float()
        top2 = last.topk(2, dim=-1).values
        margins.append((top2[:, 0] - top2[:, 1]).tolist())
        seqs = torch.cat([seqs, last.argmax(-1, keepdim=True)], dim=1)
    return {"prompt_logprobs": prompt_lp.tolist(), "greedy": seqs[:, prompts.shape[1]:].tolist(),
            "margins": [list(m) for m in zip(*margins)]}


def serve(export_dir: Path, prompts: torch.Tensor, new_tokens: int, timeout_s: int = 600) -> dict:
    """vLLM's result for the export (or its refusal)."""
    python = vllm_python()
    request = {"model": str(export_dir), "prompts": prompts.tolist(), "max_new_tokens": new_tokens,
               "max_model_len": prompts.shape[1] + new_tokens + 16}
    req, res = export_dir.parent / f"{export_dir.name}.request.json", export_dir.parent / f"{export_dir.name}.result.json"
    req.write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "TRITON_"))}
    proc = subprocess.run([python, str(DRIVER), str(req), str(res)], capture_output=True, text=True,
                          timeout=timeout_s, env=env, cwd=str(export_dir.parent))
    if proc.returncode != 0 or not res.is_file():
        raise RuntimeError(f"vLLM driver crashed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(res.read_text())


def agreement(ours: dict, theirs: dict) -> dict:
    """Per-token logprob differences (mean |d|, mean d = log of the perplexity ratio, its standard
    error), perplexities of both over the prompts, and the first greedy divergence per prompt."""
    a = torch.tensor(ours["prompt_logprobs"], dtype=torch.float64)
    b = torch.tensor(theirs["prompt_logprobs"], dtype=torch.float64)
    diverged = []
    for row, (x, y) in enumerate(zip(ours["greedy"], theirs["greedy"])):
        first = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None)
        if first is not None:
            diverged.append({"row": row, "at": first, "our_margin": ours["margins"][row][first]})
    d = (b - a).flatten()
    return {"mean_abs_dlogprob": float(d.abs().mean()), "mean_dlogprob": float(d.mean()),
            "stderr_dlogprob": float(d.std() / math.sqrt(d.numel())), "ppl_ours": math.exp(float(-a.mean())),
            "ppl_vllm": math.exp(float(-b.mean())), "diverged": diverged}

