"""`nemo-quant eval` as a user runs it: plain python and torchrun, on a tiny GGUF and own text."""
import json
import math
import os
import re
import subprocess
import sys

import pytest

from nemo_quant.runtime.distributed_init import free_port

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def text_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    (root / "eval.txt").write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 20)
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of calibration text"}) for i in range(40)))
    return root


def _eval_args(tiny_dir, text_files, run_dir):
    return ["eval", f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny", "data=files",
            f"data.eval_files=[{text_files / 'eval.txt'}]", "data.seq_length=32", "data.eval_samples=4",
            f"hydra.run.dir={run_dir}"]


def _run(cmd, env=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, **kw)


def _perplexity(stdout):
    return float(re.search(r"^perplexity\s+([\d.]+)", stdout, re.M).group(1))


def test_eval_single_process_and_torchrun_agree(tiny_dir, text_files, tmp_path):
    single = _run([sys.executable, "-m", "nemo_quant.cli.main", *_eval_args(tiny_dir, text_files, tmp_path / "a")])
    assert single.returncode == 0, single.stderr[-3000:]
    ppl = _perplexity(single.stdout)
    saved = json.loads((tmp_path / "a" / "results.json").read_text())
    assert saved["perplexity"] == pytest.approx(ppl, abs=1e-4) and saved["predictions"] == 4 * 31
    assert math.isfinite(ppl) and ppl > 1.0

    tp2 = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
                "-m", "nemo_quant.cli.main", *_eval_args(tiny_dir, text_files, tmp_path / "b"), "parallel.tp=2"])
    assert tp2.returncode == 0, tp2.stderr[-3000:]
    assert _perplexity(tp2.stdout) == pytest.approx(ppl, rel=1e-5)
    assert tp2.stdout.count("perplexity") == 1  # only rank 0 reports


def test_bad_override_fails_before_work(tmp_path):
    result = _run([sys.executable, "-m", "nemo_quant.cli.main", "eval", "data.seq_lenght=3", f"hydra.run.dir={tmp_path}"])
    assert result.returncode != 0
    assert "seq_lenght" in result.stderr


def test_unknown_command_is_rejected():
    result = _run([sys.executable, "-m", "nemo_quant.cli.main", "quantise"])
    assert result.returncode != 0 and "unknown command 'quantise'" in result.stderr


def test_ptq_then_qat_then_eval_of_the_checkpoint(tiny_dir, text_files, tmp_path):
    """The user flow: PTQ a model and save it, continue with QAT from it, evaluate the result."""
    base = [f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny", "data=files",
            f"data.eval_files=[{text_files / 'eval.txt'}]", f"data.calib_files=[{text_files / 'calib.jsonl'}]",
            "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4"]
    cli = [sys.executable, "-m", "nemo_quant.cli.main"]
    ptq = _run([*cli, "ptq", *base, "quant=w4a8_awq", "+quant/kv_cache=fp8", "quant.weight.block_size=32",
                f"checkpoint.save={tmp_path / 'ptq'}", "export=hf", f"export.path={tmp_path / 'ptq_hf'}",
                f"hydra.run.dir={tmp_path / 'r1'}"])
    assert ptq.returncode == 0, ptq.stderr[-3000:]
    assert "| tiny  | w4a8_awq |" in ptq.stdout and (tmp_path / "ptq" / "nemo_quant_modes.json").is_file()
    assert re.search(r"^export quant_algo\s+W4A8_AWQ", ptq.stdout, re.M), ptq.stdout

    train = _run([*cli, "train", *base, f"checkpoint.load={tmp_path / 'ptq'}", f"checkpoint.save={tmp_path / 'qat'}",
                  "train.steps=4", "train.save_every=2", "train.seq_length=16", "train.lr=1e-3",
                  f"hydra.run.dir={tmp_path / 'r2'}"])
    assert train.returncode == 0, train.stderr[-3000:]
    assert (tmp_path / "qat" / "latest").read_text() == "step_4"
    assert "quantize" in train.stdout

    evaluated = _run([*cli, "eval", *base, f"checkpoint.load={tmp_path / 'qat' / 'step_4'}", f"hydra.run.dir={tmp_path / 'r3'}"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert math.isfinite(_perplexity(evaluated.stdout))

    again = _run([*cli, "ptq", *base, "quant=fp8", f"checkpoint.save={tmp_path / 'ptq'}", f"hydra.run.dir={tmp_path / 'r4'}"])
    assert again.returncode != 0 and "checkpoint.overwrite=true" in again.stderr

    # The QAT result as deployable checkpoints, in a different inference layout, then validated.
    export = _run([*cli, "export", *base, f"checkpoint.load={tmp_path / 'qat' / 'step_4'}", "export=both",
                   f"export.path={tmp_path / 'deploy'}", "export.inference_pp=2", f"hydra.run.dir={tmp_path / 'r5'}"])
    assert export.returncode == 0, export.stderr[-3000:]
    checked = _run([*cli, "validate", str(tmp_path / "ptq_hf"), str(tmp_path / "deploy" / "hf"), str(tmp_path / "deploy" / "trtllm")])
    assert checked.returncode == 0 and checked.stdout.count(": OK") == 3, checked.stdout
    (tmp_path / "deploy" / "trtllm" / "rank1.safetensors").unlink()
    broken = _run([*cli, "validate", str(tmp_path / "deploy" / "trtllm")])
    assert broken.returncode == 1 and "missing rank1.safetensors" in broken.stdout
    exists = _run([*cli, "export", *base, f"checkpoint.load={tmp_path / 'qat' / 'step_4'}", "export=hf",
                   f"export.path={tmp_path / 'deploy'}", f"hydra.run.dir={tmp_path / 'r6'}"])
    assert exists.returncode != 0 and "export.overwrite=true" in exists.stderr


def _quant_perplexity(stdout: str, preset: str) -> float:
    return float(re.search(rf"^\|\s*tiny\s*\|\s*{preset}\s*\|\s*([\d.]+)", stdout, re.M).group(1))


def test_ptq_under_torchrun_tp2_and_dp2_matches_tp1(tiny_dir, text_files, tmp_path):
    args = ["ptq", f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny", "data=files",
            f"data.eval_files=[{text_files / 'eval.txt'}]", f"data.calib_files=[{text_files / 'calib.jsonl'}]",
            "data.seq_length=16", "data.eval_samples=4", "data.calib_samples=4", "quant=int8_weight_only",
            "+quant/input=int8"]
    single = _run([sys.executable, "-m", "nemo_quant.cli.main", *args, f"hydra.run.dir={tmp_path / 'a'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    ref = _quant_perplexity(single.stdout, "int8_weight_only")
    for layout in ("parallel.tp=2", "parallel.tp=1"):  # TP=2, and DP=2 (2 processes at TP=1)
        run = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                    str(free_port()), "-m", "nemo_quant.cli.main", *args, layout, f"hydra.run.dir={tmp_path / layout.replace('=', '')}"])
        assert run.returncode == 0, run.stderr[-3000:]
        assert _quant_perplexity(run.stdout, "int8_weight_only") == pytest.approx(ref, rel=1e-4), layout


def test_auto_mixed_precision_plan_is_reusable(tiny_dir, text_files, tmp_path):
    """`ptq quant=auto` writes its plan as a quant preset; a second run that loads the plan
    through --config-dir quantizes identically (same perplexity)."""
    base = ["ptq", f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny", "data=files",
            f"data.eval_files=[{text_files / 'eval.txt'}]", f"data.calib_files=[{text_files / 'calib.jsonl'}]",
            "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4"]
    cli = [sys.executable, "-m", "nemo_quant.cli.main"]
    auto = _run([*cli, *base, "quant=auto", "quant.auto.score_windows=2", f"hydra.run.dir={tmp_path / 'r1'}"])
    assert auto.returncode == 0, auto.stderr[-3000:]
    plan = tmp_path / "r1" / "quant" / "auto_plan.yaml"
    assert plan.is_file() and "effective bits" in auto.stdout
    again = _run([*cli, *base, "--config-dir", str(tmp_path / "r1"), "quant=auto_plan", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert _quant_perplexity(again.stdout, "auto_6bits") == pytest.approx(_quant_perplexity(auto.stdout, "auto_6bits"), rel=1e-6)


def test_cfg_job_prints_the_composed_config():
    result = _run([sys.executable, "-m", "nemo_quant.cli.main", "ptq", "quant=fp8", "+quant/kv_cache=fp8", "--cfg", "job"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "command: ptq" in result.stdout and "format: fp8_e4m3" in result.stdout


@pytest.mark.parametrize("command, extra", [
    ("ptq", ["quant=int4_awq", "export=hf"]),                      # ragged groups: TINY's 64 inputs, groups of 128
    ("train", ["quant=fp8", "+quant/kv_cache=nvfp4", "export=hf", "train.steps=2"]),  # NVFP4 KV cache: no layout
    ("ptq", ["quant=fp8", "export=trtllm", "export.inference_tp=3"]),  # 3 does not divide 4 heads / 2 groups
    ("ptq", ["sparsity=admm", "sparsity.exclude=[output_layer,decoder.layers.9.*]", "export=hf"]),  # no layer 9
    # compressed-tensors has no pre_quant_scale: AWQ must fold o_proj/down_proj scales (quant.search.fold_all_scales)
    ("ptq", ["quant=int4_awq", "quant.weight.block_size=32", "export=compressed_tensors"]),
])
def test_refusals_come_before_any_forward_pass(tiny_dir, text_files, tmp_path, command, extra):
    """The job stops right after the model is built: no baseline, no calibration, nothing written."""
    import time

    out = tmp_path / "export"
    args = [f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny", "data=files", "data.seq_length=16",
            f"data.eval_files=[{text_files / 'eval.txt'}]", f"data.calib_files=[{text_files / 'calib.jsonl'}]",
            f"export.path={out}", f"checkpoint.save={tmp_path / 'ckpt'}", f"hydra.run.dir={tmp_path / 'run'}"]
    start = time.perf_counter()
    result = _run([sys.executable, "-m", "nemo_quant.cli.main", command, *args, *extra])
    elapsed = time.perf_counter() - start
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"nemo-quant {command}: PreflightError: "), result.stderr[-2000:]
    assert re.search(r"(quant|export|sparsity)\.\w+", message), message          # names the key
    assert "perplexity" not in result.stdout and "calibrat" not in result.stdout.lower()
    assert not out.exists() and not (tmp_path / "ckpt").exists()
    assert elapsed < 60, f"refused after {elapsed:.0f} s"


def test_ptq_reuses_a_cached_baseline_and_says_so(tiny_dir, text_files, tmp_path):
    args = [sys.executable, "-m", "nemo_quant.cli.main", "ptq", f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny",
            "data=files", f"data.eval_files=[{text_files / 'eval.txt'}]", f"data.calib_files=[{text_files / 'calib.jsonl'}]",
            "data.seq_length=16", "data.eval_samples=3", "data.calib_samples=2", "quant=fp8"]
    runs = [_run([*args, f"hydra.run.dir={tmp_path / str(i)}", *extra], env={"NEMO_QUANT_QUIET": "0"})
            for i, extra in enumerate([[], [], ["baseline_cache=false"]])]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    baselines = [json.loads((tmp_path / str(i) / "results.json").read_text())["baseline_ppl"] for i in range(3)]
    assert baselines[0] == baselines[1] == pytest.approx(baselines[2], rel=1e-9)
    assert "cached" not in runs[0].stdout and "(cached" in runs[1].stdout and "cached" not in runs[2].stdout
    # evaluated (a progress line for "perplexity" twice: baseline and quantized) vs cached (once)
    assert runs[0].stderr.count("perplexity: 3/3") == 2 and runs[1].stderr.count("perplexity: 3/3") == 1


def test_sparse_ptq_then_masked_fine_tune_then_export(tiny_dir, text_files, tmp_path):
    """`ptq sparsity=... quant=...` prunes then quantizes; `train sparsity=...` prunes and fine-tunes
    with the masks kept, resumes, and exports a checkpoint the validator accepts as 2:4."""
    base = [f"model.path={tiny_dir / 'tiny.gguf'}", "model.name=tiny", "data=files",
            f"data.eval_files=[{text_files / 'eval.txt'}]", f"data.calib_files=[{text_files / 'calib.jsonl'}]",
            "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4"]
    cli = [sys.executable, "-m", "nemo_quant.cli.main"]
    ptq = _run([*cli, "ptq", *base, "sparsity=sparsegpt", "quant=fp8", "export=hf", f"export.path={tmp_path / 'ptq_hf'}",
                f"hydra.run.dir={tmp_path / 'r1'}"])
    assert ptq.returncode == 0, ptq.stderr[-3000:]
    assert "| tiny  | sparsegpt + fp8 |" in ptq.stdout, ptq.stdout
    results = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert results["sparsify_s"] > 0 and results["export_quant_algo"] == "FP8"

    train_args = [*cli, "train", *base, "sparsity=admm", "sparsity.admm.iterations=4", f"checkpoint.save={tmp_path / 'ft'}",
                  "train.steps=4", "train.save_every=2", "train.seq_length=16", "train.lr=1e-3", "train.warmup_steps=2",
                  "export=both", f"export.path={tmp_path / 'ft_out'}", "export.overwrite=true"]
    train = _run([*train_args, f"hydra.run.dir={tmp_path / 'r2'}"])
    assert train.returncode == 0, train.stderr[-3000:]
    assert "admm applied" in train.stdout
    resumed = _run([*train_args, "train.steps=6", f"hydra.run.dir={tmp_path / 'r3'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 4)" in resumed.stdout
    checked = _run([*cli, "validate", str(tmp_path / "ptq_hf"), str(tmp_path / "ft_out" / "hf"),
                    str(tmp_path / "ft_out" / "trtllm")])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = json.loads((tmp_path / "ft_out" / "hf" / "config.json").read_text())
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"


def test_qlora_train_resume_and_export_from_the_command_line(text_files, tmp_path):
    """`nemo-quant train qlora=nf4` fine-tunes, resumes, refuses a changed qlora config on resume,
    and exports the bitsandbytes base + PEFT adapter; qlora with quant= is refused before work."""
    from tests.tiny_models import QTINY, write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path / "qtiny", QTINY)
    base = [f"model.path={model}", "model.name=qtiny", "data=files", f"data.eval_files=[{text_files / 'eval.txt'}]",
            f"data.calib_files=[{text_files / 'calib.jsonl'}]", "data.seq_length=16", "data.eval_samples=2"]
    cli = [sys.executable, "-m", "nemo_quant.cli.main"]
    train_args = [*cli, "train", *base, "qlora=nf4", "qlora.rank=4", f"checkpoint.save={tmp_path / 'ck'}",
                  "train.steps=4", "train.save_every=2", "train.seq_length=16", "train.lr=1e-3"]
    first = _run([*train_args, f"hydra.run.dir={tmp_path / 'r1'}"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert "nf4 applied" in first.stdout and "modes               qlora" in first.stdout
    changed = _run([*train_args, "qlora.rank=8", "train.steps=6", f"hydra.run.dir={tmp_path / 'r2'}"])
    assert changed.returncode != 0
    assert "qlora.rank=8 (the run has 4)" in changed.stderr
    resumed = _run([*train_args, "train.steps=6", "export=peft", f"export.path={tmp_path / 'out'}",
                    f"hydra.run.dir={tmp_path / 'r3'}"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "(step 4)" in resumed.stdout
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert json.loads((tmp_path / "out" / "base" / "config.json").read_text())["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    both = _run([*cli, "train", *base, "qlora=nf4", "quant=int4_awq", f"checkpoint.save={tmp_path / 'x'}",
                 f"hydra.run.dir={tmp_path / 'r4'}"])
    assert both.returncode != 0 and "quant=int4_awq and qlora=nf4 would both quantize the same weights" in both.stderr
    assert not (tmp_path / "x").exists()


def test_prune_then_distill_then_qad_from_the_command_line(text_files, tmp_path):
    """`nemo-quant prune` reports the shrink and saves; `train distill=logits` recovers from that
    checkpoint (teacher: the unpruned model) and exports the pruned shapes; QAD (quant + distill)
    trains; bad prune/distill input fails before any work."""
    from tests.tiny_models import write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path / "tiny")
    base = [f"model.path={model}", "model.name=tiny", "data=files", f"data.eval_files=[{text_files / 'eval.txt'}]",
            f"data.calib_files=[{text_files / 'calib.jsonl'}]", "data.seq_length=16", "data.eval_samples=2",
            "data.calib_samples=4"]
    cli = [sys.executable, "-m", "nemo_quant.cli.main"]
    pruned = _run([*cli, "prune", *base, "prune=minitron", "prune.target.ffn_hidden_size=64", "prune.target.num_layers=3",
                   f"checkpoint.save={tmp_path / 'pruned'}", f"hydra.run.dir={tmp_path / 'r1'}"])
    assert pruned.returncode == 0, pruned.stderr[-3000:]
    result = json.loads((tmp_path / "r1" / "results.json").read_text())
    assert result["params_after"] < result["params_before"] and result["sizes"]["num_layers"] == 3
    assert "| tiny  | L3 h64 heads 4/2 ffn 64" in pruned.stdout, pruned.stdout
    train = [*cli, "train", *base, f"checkpoint.load={tmp_path / 'pruned'}", "distill=logits", "train.steps=3",
             "train.save_every=3", "train.seq_length=16", "train.lr=1e-3"]
    distilled = _run([*train, f"checkpoint.save={tmp_path / 'kd'}", "export=hf", f"export.path={tmp_path / 'hf'}",
                      f"hydra.run.dir={tmp_path / 'r2'}"])
    assert distilled.returncode == 0, distilled.stderr[-3000:]
    assert "distill=logits" in distilled.stdout
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_hidden_layers"] == 3 and config["intermediate_size"] == 64
    qad = _run([*cli, "train", *base, "quant=fp8", "distill=logits", "train.steps=2", "train.seq_length=16",
                f"checkpoint.save={tmp_path / 'qad'}", f"hydra.run.dir={tmp_path / 'r3'}"])
    assert qad.returncode == 0, qad.stderr[-3000:]
    assert "fp8 applied" in qad.stdout and "distill=logits" in qad.stdout
    for bad, message in ((["prune", "prune=minitron", "prune.target.num_attention_heads=3"], "breaks GQA"),
                         (["prune", "prune=minitron"], "prune.target sets nothing to prune"),
                         (["train", "distill=logits", "distill.temperature=0"], "distill.temperature=0"),
                         (["eval", "prune=minitron_depth"], "would be ignored")):
        refused = _run([*cli, *bad[:1], *base, *bad[1:], f"checkpoint.save={tmp_path / 'x'}",
                        f"hydra.run.dir={tmp_path / 'bad'}"])
        assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-2000:]
        assert not (tmp_path / "x").exists()
