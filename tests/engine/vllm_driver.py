"""Runs inside vLLM's own virtualenv (`make vllm-venv`), one process per checkpoint: loads an
exported checkpoint with vLLM's CPU build and scores token ids.

Request (JSON file, argv[1]): {"model", "prompts": [[ids]], "max_new_tokens", "max_model_len"}.
Result (JSON file, argv[2]): {"ok": true, "prompt_logprobs": [[logprob of token t given < t]],
"greedy": [[ids]], "load_s", "prompt_tok_s", "decode_tok_s"} or {"ok": false, "error": "<vLLM's
message>"} when vLLM refuses the checkpoint. Nothing from nemo_quant is imported here.

Three settings of vLLM's CPU build, all stated in the README's engine section:
- NVFP4 has no CPU kernel registered; vLLM's own emulation kernel (dequantize, bf16 GEMM) is
  registered for the CPU platform so that vLLM's NVFP4 loader and scales are what is tested.
- VLLM_CPU_INT4_W4A8=0: on AMX machines vLLM otherwise runs W4A16 layers with int8-quantized
  activations (W4A8 numerics), which is not the format the checkpoint declares.
- W8A8 INT8 runs through vLLM's oneDNN kernel (see `_route_int8_through_onednn`).
"""
import json
import os
import sys
import time
import traceback

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def _register_nvfp4_emulation() -> None:
    from vllm.model_executor.kernels import linear
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum

    linear._POSSIBLE_NVFP4_KERNELS[PlatformEnum.CPU] = [EmulationNvFp4LinearKernel]


def _route_int8_through_onednn() -> None:
    """On AMX machines vLLM's CPU build runs symmetric W8A8 layers through its SGL kernel, which
    quantizes activations per token and ignores the checkpoint's static input scale; its oneDNN
    kernel honours the scale, so the tier routes INT8 there to test what the checkpoint declares."""
    import torch
    from vllm.model_executor.kernels.linear.scaled_mm import cpu

    original = cpu.check_cpu_sgl_kernel
    cpu.check_cpu_sgl_kernel = lambda n, k, dtype: False if dtype == torch.int8 else original(n, k, dtype)


def _message(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def run(request: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    _register_nvfp4_emulation()
    _route_int8_through_onednn()
    start = time.perf_counter()
    try:
        llm = LLM(model=request["model"], skip_tokenizer_init=True, enforce_eager=True, dtype="bfloat16",
                  max_model_len=request["max_model_len"], seed=0)
    except Exception as e:  # noqa: BLE001 - vLLM's refusal is the result
        return {"ok": False, "error": _message(e), "trace": traceback.format_exc()[-4000:]}
    load_s = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in request["prompts"]]
    n_prompt = sum(len(ids) for ids in request["prompts"])
    t0 = time.perf_counter()
    scored = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    greedy = llm.generate(prompts, SamplingParams(max_tokens=request["max_new_tokens"], temperature=0.0,
                                                  ignore_eos=True))
    decode_s = time.perf_counter() - t0
    logprobs = []
    for out, ids in zip(scored, request["prompts"]):
        row = []
        for pos, entry in enumerate(out.prompt_logprobs[1:], start=1):
            row.append(entry[ids[pos]].logprob)
        logprobs.append(row)
    return {"ok": True, "prompt_logprobs": logprobs, "greedy": [list(o.outputs[0].token_ids) for o in greedy],
            "load_s": load_s, "prompt_tok_s": n_prompt / prompt_s,
            "decode_tok_s": request["max_new_tokens"] * len(prompts) / decode_s}


if __name__ == "__main__":
    req = json.loads(open(sys.argv[1]).read())
    result = run(req)
    with open(sys.argv[2], "w") as fh:
        json.dump(result, fh)
