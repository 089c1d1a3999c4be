"""NemoQuantTransform and NemoQuantQLoRA in real NeMo 2.7.3 jobs on CPU (`make test-nemo`: NeMo's
own virtualenv; the jobs run there, this test drives them): QAT at TP=1 and TP=2 with gradients
reaching every mutated module, TP=2 scales equal to TP=1's, a resumed job keeping the
checkpoint's scales; QLoRA as a NeMo PEFT training only its adapters, saved adapter-only."""
import json
import os
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.nemo
JOB = Path(__file__).parent / "nemo_job.py"


def _job(tmp_path: Path, name: str, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    python = os.environ.get("NEMO_QUANT_NEMO_PYTHON")
    assert python, "NEMO_QUANT_NEMO_PYTHON is not set: run `make test-nemo` (it builds NeMo's virtualenv)"
    out = tmp_path / f"{name}.jsonl"
    proc = subprocess.run([python, str(JOB), str(out), str(tmp_path / name), *args], capture_output=True, text=True,
                          timeout=900, cwd=tmp_path)
    rows = [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []
    return proc, sorted(rows, key=lambda r: r["rank"])


def _trained(proc, rows, ranks, mode="quantize", fc1="QuantColumnParallelLinear"):
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert [r["rank"] for r in rows] == list(range(ranks))
    for r in rows:
        assert (mode is None or r["modes"] == [mode]) and r["fc1"] == fc1
        # Megatron's DDP hooks captured the parameters before the transform: an in-place class swap
        # keeps them, so every weight still receives its gradient (main_grad) through the fake quantizers
        assert r["weights"] and r["with_grad"] == r["weights"]
        if "quantize" in r["modes"]:
            assert r["amax"] and all(v == v for values in r["amax"].values() for v in values)  # calibrated, no NaN


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp1")
    proc, rows = _job(tmp, "run")
    _trained(proc, rows, 1)
    checkpoints = sorted((tmp / "run").glob("default/*/checkpoints/*consumed_samples*"))
    assert checkpoints, proc.stdout[-2000:]
    return rows[0], checkpoints[-1]


def test_qat_at_tp1_trains_every_weight_and_saves_the_modes(tp1):
    row, checkpoint = tp1
    assert (checkpoint / "weights" / "metadata.json").is_file()


def test_tp2_calibrates_to_the_scales_of_tp1(tp1, tmp_path):
    proc, rows = _job(tmp_path, "tp2", "--tp", "2")
    _trained(proc, rows, 2)
    for r in rows:
        assert r["amax"].keys() == tp1[0]["amax"].keys()
        for name, values in r["amax"].items():
            assert values == pytest.approx(tp1[0]["amax"][name], rel=1e-6), name


def test_a_resumed_job_keeps_the_checkpoint_scales(tp1, tmp_path):
    """Recalibrating would measure the trained weights (different amax); resuming restores the
    scales QAT trained with, frozen, and training goes on."""
    proc, rows = _job(tmp_path, "resumed", "--steps", "5", "--resume", str(tp1[1]))
    _trained(proc, rows, 1)
    assert rows[0]["amax"] == tp1[0]["amax"]


def test_an_unknown_preset_fails_before_the_job_starts(tmp_path):
    proc, rows = _job(tmp_path, "bad", "--quant", "fp9")
    assert proc.returncode != 0 and not rows
    assert "fp9" in proc.stderr and "Trainer.fit" not in proc.stderr


@pytest.mark.parametrize("tp", [1, 2])
def test_qlora_as_a_nemo_peft_trains_and_saves_only_the_adapters(tmp_path, tp):
    from torch.distributed.checkpoint import FileSystemReader

    proc, rows = _job(tmp_path, "qlora", "--qlora", "nf4", "--tp", str(tp))
    _trained(proc, rows, tp, mode="qlora", fc1="LoRAColumnParallelLinear")
    assert all(n.endswith(("lora_A", "lora_B")) for r in rows for n in r["weights"])
    checkpoint = sorted((tmp_path / "qlora").glob("default/*/checkpoints/*consumed_samples*"))[-1] / "weights"
    assert (checkpoint / "adapter_metadata.json").is_file()
    keys = [k for k in FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
            if not k.startswith("optimizer")]
    assert keys and all(k.endswith(("lora_A", "lora_B")) for k in keys), keys


def test_sparsity_then_fp8_keeps_its_masks_through_training_and_resume(tmp_path):
    """2:4 (magnitude) then FP8 in one transform: the pruned weights stay exactly zero while the kept
    ones train, and a resumed job restores the masks (fresh sparse modules would keep 4 of 4)."""
    proc, rows = _job(tmp_path, "sparse", "--sparsity", "magnitude")
    _trained(proc, rows, 1, mode=None, fc1="QuantSparseColumnParallelLinear")
    assert rows[0]["modes"] == ["sparsity", "quantize"]
    assert rows[0]["kept_per_4"] == [2] and rows[0]["pruned_zero"]
    checkpoint = sorted((tmp_path / "sparse").glob("default/*/checkpoints/*consumed_samples*"))[-1]
    proc, resumed = _job(tmp_path, "resumed", "--sparsity", "magnitude", "--steps", "5", "--resume", str(checkpoint))
    _trained(proc, resumed, 1, mode=None, fc1="QuantSparseColumnParallelLinear")
    assert resumed[0]["kept_per_4"] == [2] and resumed[0]["pruned_zero"] and resumed[0]["amax"] == rows[0]["amax"]
