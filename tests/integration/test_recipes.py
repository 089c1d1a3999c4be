"""Recipes run end to end as users run them (on the tiny model and a few steps)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.distributed
RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def _recipe(name: str, tmp_path: Path, model: Path, env: dict, overrides: list[str] = (), model_name: str = "tiny"):
    """Run recipes/<name> on `model` with the tiny text as every dataset; the finished process."""
    (tmp_path / "text.txt").write_text("It is a truth universally acknowledged, that a single man in possession. " * 40)
    data = [f"data.eval_files=[{tmp_path / 'text.txt'}]", f"data.calib_files=[{tmp_path / 'text.txt'}]",
            "data=files", "data.seq_length=16", "data.eval_samples=2", "data.calib_samples=4", "train.seq_length=16",
            f"model.name={model_name}", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OUT": str(tmp_path / "out"), "STEPS": "3", "MODEL": str(model),
           "NQ": f"{sys.executable} -m nemo_quant.cli.main", "NEMO_QUANT_CACHE": str(tmp_path / "cache"), **env}
    return subprocess.run(["bash", str(RECIPES / name), *data], env=env, capture_output=True, text=True, timeout=600)


def _ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def test_sparse_finetune_fp8_recipe(tiny_dir, tmp_path):
    _ok(_recipe("sparse_finetune_fp8.sh", tmp_path, tiny_dir / "tiny.gguf", {}, [f"hydra.run.dir={tmp_path / 'run'}"]))
    config = json.loads((tmp_path / "out" / "deploy" / "hf" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"


def test_qlora_merge_ptq_recipe(tmp_path):
    from tests.tiny_models import QTINY, write_hf_checkpoint

    model = write_hf_checkpoint(tmp_path / "qtiny", QTINY)
    result = _recipe("qlora_merge_ptq.sh", tmp_path, model, {}, [f"hydra.run.dir={tmp_path / 'run'}"], "qtiny")
    _ok(result)
    assert "bitsandbytes-nf4 + peft-adapter checkpoint" in result.stdout
    config = json.loads((tmp_path / "out" / "deploy" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "W4A16_AWQ"


def test_prune_distill_quantize_recipe(tiny_dir, tmp_path):
    _ok(_recipe("prune_distill_quantize.sh", tmp_path, tiny_dir / "tiny.gguf",
                {"PRUNE": "minitron_ffn", "PRUNE_OVERRIDES": "prune.target.ffn_hidden_size=64"},
                [f"hydra.run.dir={tmp_path / 'run'}"]))
    config = json.loads((tmp_path / "out" / "deploy" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8" and config["intermediate_size"] == 64


def test_speculative_heads_recipe(tiny_dir, tmp_path):
    _ok(_recipe("speculative_heads.sh", tmp_path, tiny_dir / "tiny.gguf", {"STEPS": "2", "HEADS": "eagle3"},
                ["speculative.prompt_tokens=8", "speculative.continuation_tokens=8", "speculative.eval_prompts=2",
                 "speculative.eval_stride=32"]))
    acceptance = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())["acceptance"]
    assert set(acceptance["tau"]) == {"1", "3", "5"}
    assert json.loads((tmp_path / "out" / "draft" / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]


def test_ptq_export_recipe(tiny_dir, tmp_path):
    _ok(_recipe("ptq_export.sh", tmp_path, tiny_dir / "tiny.gguf", {"QUANT": "int8_sq", "FORMAT": "compressed_tensors"},
                ["quant.search.fold_all_scales=true", f"hydra.run.dir={tmp_path / 'run'}"]))
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["quant_ppl"] > 1.0
    assert (tmp_path / "out" / "deploy" / "config.json").is_file()


def test_qad_recipe_is_qat_with_a_teacher(tiny_dir, tmp_path):
    """qad.sh runs qat.sh's four steps (PTQ, training from it, eval of the run's latest checkpoint,
    export) with distill=logits."""
    result = _recipe("qad.sh", tmp_path, tiny_dir / "tiny.gguf", {"QUANT": "fp8", "STEPS": "2"})
    _ok(result)
    assert "distill=logits" in result.stdout and "its latest checkpoint, step_2" in result.stdout
    config = json.loads((tmp_path / "out" / "deploy" / "config.json").read_text())
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert json.loads((tmp_path / "out" / "train" / "step_2" / "trainer_state.json").read_text())["step"] == 2


@pytest.mark.parametrize("recipe, env, message", [
    ("qat.sh", {"FORMAT": "onnx"}, "nemo-quant export checkpoint.load="),
    ("ptq_export.sh", {"QUANT": "fp9"}, "nemo-quant ptq quant=fp9"),
    ("prune_distill_quantize.sh", {"MODEL": "/nonexistent/model.gguf"}, "MODEL=/nonexistent/model.gguf does not exist"),
    ("speculative_heads.sh", {"NQ": "/nonexistent/nemo-quant"}, "'/nonexistent/nemo-quant' not found"),
])
def test_a_recipe_with_bad_inputs_stops_before_its_first_step(tiny_dir, tmp_path, recipe, env, message):
    result = _recipe(recipe, tmp_path, tiny_dir / "tiny.gguf", env)
    assert result.returncode == 2 and message in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()  # nothing ran
