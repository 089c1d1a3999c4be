"""`+nemo_quant=...` in a foreign Hydra app (tests/foreign_hydra_app), with nemo_quant installed the
way users install it (a regular install: Hydra does not discover plugins in an editable one)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

APP = Path(__file__).parents[1] / "foreign_hydra_app" / "train.py"
ROOT = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(ROOT)], check=True)
    assert (target / "hydra_plugins" / "nemo_quant_searchpath" / "nemo_quant" / "fp8.yaml").is_file()
    assert not (target / "hydra_plugins" / "__init__.py").exists()  # a namespace Hydra can list
    return target


def _run(site: Path, tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, dict | None]:
    result = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(APP), f"hydra.run.dir={tmp_path / 'run'}", f"result={result}",
                           *overrides], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(site)})
    return proc, json.loads(result.read_text()) if result.is_file() else None


def test_a_quant_preset_composes_calibrates_trains_and_exports(site, tmp_path):
    from nemo_quant.export.validate import validate_checkpoint

    proc, r = _run(site, tmp_path, "+nemo_quant=fp8", "nemo_quant.calib_batches=2", "+nemo_quant/export=hf",
                   f"nemo_quant.export.path={tmp_path / 'hf'}", "nemo_quant.vocab_size=257")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert validate_checkpoint(tmp_path / "hf").ok
    assert "NemoQuantCallback" in r["callbacks"] and "QuantColumnParallelLinear" in r["modules"]
    assert r["quantizers"] > 0 and r["calibrated"] == r["quantizers"]
    # the in-place swap keeps every weight training: each one got a gradient through the fake quantizers
    assert "gpt.decoder.layers.0.mlp.linear_fc1.weight" in r["trainable"] and r["with_grad"] == r["trainable"]


def test_a_qlora_subgroup_trains_only_the_adapters(site, tmp_path):
    proc, r = _run(site, tmp_path, "+nemo_quant/qlora=nf4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert r["trainable"] and all(n.endswith(("lora_A", "lora_B")) for n in r["trainable"])
    assert r["with_grad"] == r["trainable"] and r["quantizers"] == 0


def test_without_the_group_the_job_is_untouched(site, tmp_path):
    proc, r = _run(site, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "NemoQuantCallback" not in r["callbacks"] and "QuantColumnParallelLinear" not in r["modules"]


@pytest.mark.parametrize("overrides, message", [
    (["megatron=false", "+nemo_quant=fp8"], "holds no megatron.core GPTModel"),
    (["+nemo_quant=fp8", "+nemo_quant/qlora=nf4"], "QLoRA quantizes its own base"),
    (["+nemo_quant=fp9"], "nemo_quant/fp9"),
])
def test_bad_input_fails_before_training(site, tmp_path, overrides, message):
    proc, r = _run(site, tmp_path, *overrides)
    assert proc.returncode != 0 and r is None
    assert message in proc.stderr, proc.stderr[-3000:]
    assert "Epoch 0" not in proc.stderr  # nothing trained


def test_an_unresolved_group_is_refused_not_ignored():
    """What Hydra composes when it did not find the plugin (an editable install): a plain string."""
    from omegaconf import OmegaConf

    from nemo_quant.config.validate import ConfigError
    from nemo_quant.integrations.hydra_job import callback_from_config, callbacks

    with pytest.raises(ConfigError, match="editable install"):
        callback_from_config(OmegaConf.create({"nemo_quant": "fp8"}).nemo_quant)
    assert callbacks() == []  # outside a Hydra job
