"""Recipes run end to end as users run them (on the tiny model and a few steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def test_sparse_finetune_fp8_recipe(tiny_dir, tmp_path):
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    data = [f"data.eval_files=[{tmp_path / 'text.txt'}]", f"data.calib_files=[{tmp_path / 'text.txt'}]",
            "data=files", "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4", "train.seq_length=16",
            "model.name=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), "STEPS": "3",
           "MODEL": str(tiny_dir / "tiny.gguf"), "NQ": f"{sys.executable} -m nemo_quant.cli.main"}
    result = subprocess.run(["bash", str(RECIPES / "sparse_finetune_fp8.sh"), *data], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "deploy" / "hf" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"


def test_qlora_merge_ptq_recipe(tmp_path):
    from tests.tiny_models import QTINY, write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path / "qtiny", QTINY)
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    data = [f"data.eval_files=[{tmp_path / 'text.txt'}]", f"data.calib_files=[{tmp_path / 'text.txt'}]",
            "data=files", "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4", "train.seq_length=16",
            "model.name=qtiny", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), "STEPS": "3", "MODEL": str(model),
           "NQ": f"{sys.executable} -m nemo_quant.cli.main"}
    result = subprocess.run(["bash", str(RECIPES / "qlora_merge_ptq.sh"), *data], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "bitsandbytes-nf4 + peft-adapter checkpoint" in result.stdout
    config = json.loads((tmp_path / "out" / "deploy" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "W4A16_AWQ"


def test_prune_distill_quantize_recipe(tiny_dir, tmp_path):
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    data = [f"data.eval_files=[{tmp_path / 'text.txt'}]", f"data.calib_files=[{tmp_path / 'text.txt'}]",
            "data=files", "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4", "train.seq_length=16",
            "model.name=tiny", f"hydra.run.dir={tmp_path / 'run'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), "STEPS": "3", "PRUNE": "minitron_ffn",
           "PRUNE_OVERRIDES": "prune.target.ffn_hidden_size=64",
           "MODEL": str(tiny_dir / "tiny.gguf"), "NQ": f"{sys.executable} -m nemo_quant.cli.main"}
    result = subprocess.run(["bash", str(RECIPES / "prune_distill_quantize.sh"), *data], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    config = json.loads((tmp_path / "out" / "deploy" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8" and config["intermediate_size"] == 64


def test_speculative_heads_recipe(tiny_dir, tmp_path):
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    overrides = [f"data.eval_files=[{tmp_path / 'text.txt'}]", f"data.calib_files=[{tmp_path / 'text.txt'}]",
                 "data=files", "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4", "train.seq_length=16",
                 "model.name=tiny", "speculative.prompt_tokens=8", "speculative.continuation_tokens=8",
                 "speculative.eval_prompts=2", "speculative.eval_stride=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), "STEPS": "2", "HEADS": "eagle3",
           "MODEL": str(tiny_dir / "tiny.gguf"), "NQ": f"{sys.executable} -m nemo_quant.cli.main",
           "NEMO_QUANT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(["bash", str(RECIPES / "speculative_heads.sh"), *overrides], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    acceptance = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())["acceptance"]
    assert set(acceptance["tau"]) == {"1", "3", "5"}
    assert json.loads((tmp_path / "out" / "draft" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
