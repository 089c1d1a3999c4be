"""ModelOpt 0.43.0's `mcore_minitron` on the same SmolLM2 Megatron model, data and TP=1 (its limit).

Runs in the minitron virtualenv (`make minitron-venv`: nvidia-modelopt 0.43.0 + megatron-core
0.16.1 + nemo_quant for the model loader and the data), never in nemo_quant's own. Three CPU
shims, each a no-op for what it stands in for on a GPU (DESIGN.md, measured): torch's RMSNorm
registered in ModelOpt's dynamic-module registry (Megatron's local spec builds torch norms
without Transformer Engine), `Tensor.cuda()` as the identity, and the 0-dim layer count that
`drop_mcore_language_model_layers` all-gathers reshaped to 1-dim (gloo's all_gather_into_tensor
needs matching shapes). Writes the pruned model as an fp32 HF directory (nemo_quant's exporter)
and a JSON of the one-shot figures.

    .venv-minitron/bin/python benchmarks/modelopt_minitron.py --target ffn|depth --out DIR --results FILE
"""
from __future__ import annotations

import argparse
import json
import time

import torch

TARGETS = {"ffn": {"ffn_hidden_size": 1024}, "depth": {"num_layers": 22}}


def _shims() -> None:
    import torch.distributed as dist
    from modelopt.torch.nas.registry import DMRegistry
    from modelopt.torch.opt.dynamic import DynamicModule

    @DMRegistry.register({torch.nn.RMSNorm: "nn.RMSNorm"})
    class _DynamicRMSNorm(DynamicModule):  # noqa: F841 (registered by the decorator)
        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            self._register_dynamic_attribute(
                "weight", lambda mod, v: v[..., mod.get_hparam("num_features").active_slice].contiguous())
            self._register_dynamic_attribute("normalized_shape", lambda mod, v: (*tuple(v[:-1]), mod.num_features))

    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    gather = dist.all_gather_into_tensor

    def gather_1d(output, input_, *args, **kwargs):
        return gather(output, input_.reshape(1) if input_.dim() == 0 else input_, *args, **kwargs)

    dist.all_gather_into_tensor = gather_1d


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", choices=sorted(TARGETS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--results", required=True)
    args = parser.parse_args()

    from omegaconf import OmegaConf

    from nemo_quant.data.datasets import calibration_windows, evaluation_windows
    from nemo_quant.eval.perplexity import perplexity
    from nemo_quant.export.writer import export_checkpoint
    from nemo_quant.models.loading import load_model
    from nemo_quant.runtime.distributed_init import ParallelLayout, init_megatron
    from nemo_quant.runtime.pipeline import position_ids_for

    init_megatron(ParallelLayout(1, 1), 1234, 600)
    import modelopt.torch.prune as mtp
    from modelopt.torch.prune.plugins import mcore_minitron  # noqa: F401 (import errors surface here)

    _shims()
    loaded = load_model(None)
    data = OmegaConf.create({"name": "austen", "seq_length": 512, "calib_samples": 32, "eval_samples": 32,
                             "batch_size": 1, "calib_files": [], "eval_files": [], "jsonl_field": "text"})
    calib, evals = calibration_windows(data, loaded.tokenizer), evaluation_windows(data, loaded.tokenizer)
    baseline = perplexity(loaded.model, evals, loaded.vocab_size).perplexity

    def forward_loop(model):
        for window in calib:
            tokens = window.unsqueeze(0)
            model(tokens, position_ids_for(tokens), None)

    start = time.perf_counter()
    model, _ = mtp.prune(loaded.model, mode="mcore_minitron", constraints={"export_config": TARGETS[args.target]},
                         dummy_input=None, config={"forward_loop": forward_loop})
    seconds = time.perf_counter() - start
    import modelopt.torch.opt as mto

    mto.ModeloptStateManager.remove_state(model)
    loaded.model = model
    after = perplexity(model, evals, loaded.vocab_size).perplexity
    arch = loaded.arch
    export_checkpoint(model, arch, {"format": "hf", "path": args.out, "dtype": "float32", "overwrite": True},
                      loaded.tokenizer)
    sizes = {k: getattr(arch, k) for k in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                                           "ffn_hidden_size")}
    result = {"tool": "modelopt 0.43.0 mcore_minitron", "target": args.target, "baseline_ppl": baseline,
              "one_shot_ppl": after, "prune_s": seconds, "sizes": sizes, "params_after": arch.parameter_count()}
    with open(args.results, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
