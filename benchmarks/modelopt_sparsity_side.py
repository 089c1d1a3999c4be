"""The ModelOpt half of the side-by-side 2:4 sparsity benchmark; runs inside .venv-modelopt only.

    .venv-modelopt/bin/python benchmarks/modelopt_sparsity_side.py TOKENS.safetensors GGUF RUN [RUN ...]

RUN is `baseline`, `sparse_magnitude` or `sparsegpt`. Each run loads a fresh SmolLM2 from the GGUF
as a Hugging Face LlamaForCausalLM (fp32, modelopt_side.load_model), and, except for the baseline,
calls `modelopt.torch.sparsity.sparsify(model, RUN, config={"data_loader": ..., "collect_func": ...})`
(ModelOpt's default 2:4 pattern on every nn.Linear except lm_head) with the calibration windows as
the data loader (sparse_magnitude ignores them), timed, then `mts.export(model)` to bake the masks
into the weights. It then checks the decoder layers' Linear weights (fraction of zeros; at most 2
nonzeros in every group of 4 along the input dim) and scores the evaluation windows with
modelopt_side.perplexity. TOKENS holds int64 [N, 512] "calibration" and [M, 512] "evaluation"
windows, as for modelopt_side.py. Prints one JSON object per line; a failing run is reported, not hidden.

What ModelOpt 0.47 does (weight_sparsity/sparsegpt.py): "sparsegpt" accumulates H = 2/n X^T X per
Linear, damps it by hessian_damp=0.1 x mean(diag H), runs the OBS column sweep with weight updates on
a *copy* of the weight, and keeps only the mask (updated weight != 0): the reconstructed weights are
discarded, so the model keeps its original weights under a SparseGPT-chosen mask.
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parent))
from modelopt_side import load_model, perplexity  # noqa: E402

RUNS = ("baseline", "sparse_magnitude", "sparsegpt")


def decoder_linears(model):
    return [(name, mod) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}"]


@torch.no_grad()
def sparsity_check(model) -> tuple[float, bool]:
    """Fraction of zero weights over the decoder Linears, and whether every 1x4 input group has <= 2 nonzeros."""
    zeros, total, pattern_ok = 0, 0, True
    for _, mod in decoder_linears(model):
        w = mod.weight
        zeros += int((w == 0).sum())
        total += w.numel()
        pattern_ok &= w.shape[1] % 4 == 0 and bool(((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2).all())
    return zeros / total, pattern_ok


def run(label: str, gguf: Path, calib: torch.Tensor, evals: torch.Tensor) -> dict:
    import modelopt.torch.sparsity as mts

    if label not in RUNS:
        return {"run": label, "error": f"unknown run {label!r}; expected one of {RUNS}"}
    start = time.perf_counter()
    try:
        model = load_model(gguf)
        row: dict = {"run": label}
        if label != "baseline":
            config = {"data_loader": [w[None] for w in calib], "collect_func": lambda batch: batch}
            with contextlib.redirect_stdout(sys.stderr):  # ModelOpt prints progress to stdout
                start = time.perf_counter()
                model = mts.sparsify(model, label, config=config)
                row["sparsify_s"] = time.perf_counter() - start
                model = mts.export(model)  # masks -> weights; plain nn.Linear again
        row["zero_fraction"], row["pattern_ok"] = sparsity_check(model)
        row["perplexity"] = perplexity(model, evals)
        return {"run": label, "perplexity": row.pop("perplexity"), **row}
    except Exception as exc:  # reported in the table: a ModelOpt failure is a finding
        return {"run": label, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}",
                "elapsed_s": time.perf_counter() - start, "trace": traceback.format_exc()[-1500:]}


def main() -> None:
    tokens, gguf = load_file(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(2)
    calib, evals = tokens["calibration"], tokens["evaluation"]
    for label in sys.argv[3:]:
        print(json.dumps(run(label, gguf, calib, evals)), flush=True)


if __name__ == "__main__":
    main()
