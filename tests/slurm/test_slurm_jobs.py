"""nemo-quant-slurm against a real two-node Slurm cluster on this machine (tests/slurm/cluster.py):
a TP=2 job across the two nodes equals the local run, and a training job warned of preemption
checkpoints, is requeued and finishes with the losses of an uninterrupted run.
Run by `make test-slurm` (it installs slurm-wlm and munge); not part of `make test`."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.cluster import Cluster

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    from tests.tiny_models import write_hf_checkpoint

    root = tmp_path_factory.mktemp("inputs")
    (root / "eval.txt").write_text("Call me Ishmael. Some years ago, never mind how long precisely. " * 20)
    (root / "calib.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of calibration text"}) for i in range(40)))
    return [f"model.path={write_hf_checkpoint(root / 'tiny')}", "model.name=tiny", "data=files",
            f"data.eval_files=[{root / 'eval.txt'}]", f"data.calib_files=[{root / 'calib.jsonl'}]",
            "data.seq_length=16", "data.eval_samples=4", "data.calib_samples=8"]


def _submit(cluster: Cluster, work: Path, args: list[str], *launcher: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "nemo_quant.integrations.slurm", "--nodes", "2", "--procs-per-node", "1",
                           "--script", str(work / "job.sbatch"), "--output", str(work / "job.out"), *launcher,
                           "--", *args], capture_output=True, text=True, cwd=work, env=cluster.env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.split("submitted job ")[1].split()[0]


def _finished(cluster: Cluster, work: Path, job: str) -> str:
    state = cluster.wait(job)
    out = (work / "job.out").read_text()
    assert state == "COMPLETED", f"job {job} {state}:\n{out[-4000:]}"
    return out


def test_a_two_node_tp2_job_equals_the_local_run(cluster, base, tmp_path):
    args = ["ptq", *base, "quant=fp8"]
    local = subprocess.run([sys.executable, "-m", "nemo_quant.cli.main", *args, f"hydra.run.dir={tmp_path / 'local'}"],
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    work = tmp_path / "slurm"
    work.mkdir()
    out = _finished(cluster, work, _submit(cluster, work, [*args, "parallel.tp=2", f"hydra.run.dir={work / 'run'}"]))
    assert "on node1,node2" in out or "on node[1-2]" in out, out[-2000:]
    ours = json.loads((work / "run" / "results.json").read_text())
    ref = json.loads((tmp_path / "local" / "results.json").read_text())
    assert ours["quant_ppl"] == pytest.approx(ref["quant_ppl"], rel=1e-5)


def test_preemption_checkpoints_requeues_and_resumes_with_the_same_losses(cluster, base, tmp_path):
    train = ["train", *base, "train.steps=40", "train.save_every=5", "train.seq_length=16", "train.lr=1e-3",
             "parallel.tp=2"]
    straight, preempted = tmp_path / "straight", tmp_path / "preempted"
    for work in (straight, preempted):
        work.mkdir()
    job = _submit(cluster, straight, [*train, f"checkpoint.save={straight / 'ckpt'}", f"hydra.run.dir={straight / 'run'}"])
    _finished(cluster, straight, job)

    job = _submit(cluster, preempted, [*train, f"checkpoint.save={preempted / 'ckpt'}",
                                       f"hydra.run.dir={preempted / 'run'}"])
    deadline = time.time() + 300
    while not (preempted / "ckpt" / "step_5").is_dir():  # training is under way
        assert time.time() < deadline, (preempted / "job.out").read_text()[-3000:]
        time.sleep(0.2)
    cluster.run("scancel", "--batch", "--signal=USR1", job)  # what --signal=B:USR1@<grace> delivers
    out = _finished(cluster, preempted, job)
    assert "preemption warning" in out and "requeueing job" in out and "restart 1" in out, out[-3000:]
    stopped = [int(line.split("preempted after step ")[1].split(";")[0]) for line in out.splitlines()
               if "preempted after step " in line]
    assert stopped and 5 <= stopped[0] < 40 and (preempted / "ckpt" / f"step_{stopped[0]}").is_dir()
    ours = json.loads((preempted / "run" / "results.json").read_text())["losses"]
    ref = json.loads((straight / "run" / "results.json").read_text())["losses"]
    assert len(ours) == len(ref) == 40 and ours == ref


@pytest.mark.parametrize("extra, message", [
    (["--nodes", "2", "--", "eval", "parallel.tp=4"], "does not divide"),
    (["--", "train", "parallel.tp=1"], "needs checkpoint.save"),
    (["--", "eval", "data.seq_lenght=3"], "seq_lenght"),
])
def test_bad_layouts_fail_before_submission(cluster, tmp_path, extra, message):
    before = cluster.run("squeue", "-h", "-o", "%i")
    proc = subprocess.run([sys.executable, "-m", "nemo_quant.integrations.slurm", "--script", str(tmp_path / "x.sbatch"),
                           *extra], capture_output=True, text=True, env=cluster.env, timeout=120)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "x.sbatch").exists() and cluster.run("squeue", "-h", "-o", "%i") == before
