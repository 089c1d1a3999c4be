"""The Megatron forward on CPU side by side with Hugging Face transformers' LlamaForCausalLM.

Same weights (SmolLM2-135M from the GGUF, imported once, handed to both), same windows of
Persuasion, same dtype, same threads, one process; the models run interleaved (ours, theirs,
ours, ...) so that a busy machine slows both alike, and each figure is the best of `--repeats`.
Megatron runs with our SDPA core attention (the default) and with megatron-core's own local
one. Logits of every pair are compared (max |diff|), so the speed is for the same answer.

    .venv/bin/python benchmarks/forward_speed.py [--threads 1] [--repeats 5]
Writes benchmarks/results/forward_speed.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def hf_model(source, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_quant.export.hf import hf_model_config

    config = LlamaConfig(**hf_model_config(source.arch, dtype))
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).to(dtype).eval()
    state = {name: source.get(name).to(dtype) for name in source.names()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def megatron_model(source, dtype: torch.dtype, core_attention: str):
    from nemo_quant.models.builder import build_gpt_model
    from nemo_quant.models.importer import import_weights

    model = build_gpt_model(source.arch, dtype, core_attention=core_attention)
    import_weights(model, source)
    return model.eval()


def timed(fn) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    with torch.inference_mode():
        out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    from nemo_quant.data.datasets import evaluation_windows
    from nemo_quant.models.loading import default_model_path, load_tokenizer
    from nemo_quant.models.sources import open_source
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.runtime.pipeline import position_ids_for

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    init_megatron(ParallelLayout(1, 1), timeout_s=600)
    path = default_model_path()
    source = open_source(path)
    from omegaconf import OmegaConf

    from nemo_quant.config.schema import DataConfig

    data = OmegaConf.structured(DataConfig(seq_length=args.seq, eval_samples=max(args.batches)))
    windows = evaluation_windows(data, load_tokenizer(path))
    rows = []
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        models = {"megatron+sdpa": megatron_model(source, dtype, "sdpa"),
                  "megatron (local attention)": megatron_model(source, dtype, "megatron"),
                  "transformers": hf_model(source, dtype)}
        for batch in args.batches:
            tokens = windows[:batch]
            calls = {
                name: (lambda m=m: m(tokens, position_ids_for(tokens), None).float())
                if name.startswith("megatron") else (lambda m=m: m(input_ids=tokens).logits.float())
                for name, m in models.items()
            }
            best = {name: float("inf") for name in calls}
            logits = {}
            for _ in range(args.repeats):
                for name, call in calls.items():
                    seconds, logits[name] = timed(call)
                    best[name] = min(best[name], seconds)
            vocab = source.arch.vocab_size
            ref = logits["transformers"][..., :vocab]
            row = {"dtype": dtype_name, "batch": batch, "seq": args.seq, "threads": args.threads,
                   **{f"{name} s": round(best[name], 4) for name in calls},
                   "sdpa / transformers": round(best["megatron+sdpa"] / best["transformers"], 3),
                   "local / transformers": round(best["megatron (local attention)"] / best["transformers"], 3),
                   "max abs logit diff sdpa vs transformers": float((logits["megatron+sdpa"][..., :vocab] - ref).abs().max()),
                   "max abs logit diff local vs transformers": float(
                       (logits["megatron (local attention)"][..., :vocab] - ref).abs().max())}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del models
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "forward_speed.json").write_text(json.dumps(rows, indent=2))
    headers = list(rows[0])
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(r[h]) for h in headers) + " |" for r in rows]
    (RESULTS / "forward_speed.md").write_text(
        f"SmolLM2-135M forward (logits of {args.seq}-token windows), best of {args.repeats}, interleaved, "
        f"{args.threads} thread(s), one process, CPU.\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
