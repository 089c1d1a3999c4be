"""Speculative heads from the command line on the tiny model: train (self-distilled continuations,
generated once and then read from the cache), eval (tau), export (EAGLE-3 draft directory, Medusa
as TensorRT-LLM's MedusaForCausalLM), resume, and bad input refused before any work."""
import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "nemo_quant.cli.main"]


def _run(args, cache, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMO_QUANT_CACHE": str(cache)}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env=env, **kw)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    from tests.tiny_models import write_hf_checkpoint

    root = tmp_path_factory.mktemp("spec")
    (root / "eval.txt").write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 20)
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of calibration text"}) for i in range(40)))
    model = write_hf_checkpoint(root / "tiny")
    base = [f"model.path={model}", "model.name=tiny", "data=files", f"data.eval_files=[{root / 'eval.txt'}]",
            f"data.calib_files=[{root / 'calib.jsonl'}]", "data.seq_length=16", "data.eval_samples=2",
            "data.calib_samples=4"]
    heads = ["speculative.prompt_tokens=8", "speculative.continuation_tokens=8", "speculative.eval_prompts=3",
             "speculative.eval_stride=16"]
    train = ["train.steps=3", "train.save_every=3", "train.seq_length=16", "train.lr=1e-3", "train.micro_batch_size=2"]
    return root, base, heads, train


def test_eagle3_trains_evaluates_and_exports_a_draft(job):
    root, base, heads, train = job
    trained = _run(["train", *base, *train, "speculative=eagle3_d2t", "speculative.draft_vocab_size=64", *heads,
                    f"checkpoint.save={root / 'e3'}", f"hydra.run.dir={root / 'r1'}"], root / "cache")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "heads=eagle3" in trained.stdout and "self-distilled sequences" in trained.stdout
    evaluated = _run(["eval", *base, f"checkpoint.load={root / 'e3' / 'step_3'}", f"hydra.run.dir={root / 'r2'}"],
                     root / "cache")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    acceptance = json.loads((root / "r2" / "results.json").read_text())["acceptance"]
    assert set(acceptance["tau"]) == {"1", "3", "5"} and all(1.0 <= t <= int(k) + 1 for k, t in acceptance["tau"].items())
    assert "tau (k: tokens/step)" in evaluated.stdout
    wrong = _run(["eval", *base, f"checkpoint.load={root / 'e3' / 'step_3'}", "speculative=medusa",
                  f"hydra.run.dir={root / 'r2b'}"], root / "cache")
    assert wrong.returncode != 0 and "holds eagle3 heads" in wrong.stderr, wrong.stderr[-2000:]
    exported = _run(["export", *base, f"checkpoint.load={root / 'e3' / 'step_3'}", "export=draft",
                     f"export.path={root / 'draft'}", f"hydra.run.dir={root / 'r3'}"], root / "cache")
    assert exported.returncode == 0, exported.stderr[-3000:]
    config = json.loads((root / "draft" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"] and config["draft_vocab_size"] == 64
    from safetensors import safe_open

    with safe_open(str(root / "draft" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("d2t").shape == (64,) and f.get_tensor("lm_head.weight").shape == (64, 64)
    valid = _run(["validate", str(root / "draft")], root / "cache")
    assert valid.returncode == 0 and "eagle3-draft checkpoint" in valid.stdout, valid.stdout + valid.stderr[-2000:]
    # a second run of the same prompts reads the continuations from the cache; resuming continues
    again = _run(["train", *base, *train, "train.steps=4", "speculative=eagle3_d2t", "speculative.draft_vocab_size=64",
                  *heads, f"checkpoint.save={root / 'e3'}", f"hydra.run.dir={root / 'r4'}"], root / "cache")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "greedy continuations from the cache" in again.stdout and "resumed from" in again.stdout


def test_medusa_exports_tensorrt_llm_medusa(job):
    root, base, heads, train = job
    trained = _run(["train", *base, *train, "speculative=medusa", "speculative.num_heads=2", *heads,
                    f"checkpoint.save={root / 'med'}", "export=trtllm", f"export.path={root / 'trt'}",
                    f"hydra.run.dir={root / 'm1'}"], root / "cache")
    assert trained.returncode == 0, trained.stderr[-3000:]
    config = json.loads((root / "trt" / "config.json").read_text())
    assert config["architecture"] == "MedusaForCausalLM" and config["num_medusa_heads"] == 2
    from safetensors import safe_open

    with safe_open(str(root / "trt" / "rank0.safetensors"), "pt") as f:
        names = set(f.keys())
    assert {"medusa_heads.1.medusa_layers.0.linear.bias", "medusa_heads.1.lm_head.weight", "lm_head.weight"} <= names
    valid = _run(["validate", str(root / "trt")], root / "cache")
    assert valid.returncode == 0 and ": OK" in valid.stdout, valid.stdout + valid.stderr[-2000:]


@pytest.mark.parametrize("args,message", [
    (["ptq", "quant=fp8", "speculative=eagle3"], "must be trained"),
    (["train", "speculative=eagle3", "qlora=lora"], "need a frozen base"),
    (["eval", "speculative=medusa"], "needs the trained heads"),
    (["train", "speculative=medusa", "speculative.draft_vocab_size=10"], "EAGLE-3's reduced vocabulary"),
    (["train", "speculative=eagle3", "speculative.aux_layers=[0,7]"], "speculative.aux_layers=[0, 7]"),
    (["train", "speculative=eagle3", "speculative.draft_vocab_size=999"], "speculative.draft_vocab_size=999"),
    (["train", "speculative=eagle3", "speculative.prompt_tokens=40"], "speculative.prompt_tokens=40"),
    (["export", "export=draft"], "has none"),
])
def test_bad_speculative_input_fails_before_work(job, args, message):
    root, base, heads, train = job
    save = root / "never"
    refused = _run([args[0], *base, *train[:-1], *args[1:], f"checkpoint.save={save}",
                    *([f"export.path={root / 'never_x'}"] if "export=draft" in args else []),
                    f"hydra.run.dir={root / 'bad'}"], root / "cache")
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
    assert not save.exists() and not (root / "never_x").exists()
