"""Multi-node nemo-quant jobs under Slurm: the sbatch script and its submission.

    nemo-quant-slurm --nodes 2 --procs-per-node 8 --time 04:00:00 -- train quant=fp8 parallel.tp=8 \\
        parallel.pp=2 checkpoint.save=/shared/qat

One torchrun per node (srun, one task per node), static rendezvous at the first node's address
as the scheduler records it (`scontrol show node`: node names need not resolve). Preemption:
`--signal=B:USR1@<grace>` warns the batch shell, which creates $NEMO_QUANT_PREEMPT_FILE; the
training loop checkpoints at the current step and exits (runtime/preemption.py), and the shell
requeues the job, whose rerun resumes from that checkpoint (train.resume). The job's layout is
checked against its config before anything is submitted.
"""
from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from nemo_quant.config.compose import compose_command
from nemo_quant.config.validate import ConfigError
from nemo_quant.runtime.preemption import PREEMPT_FILE_ENV


@dataclass
class SlurmJob:
    args: list[str]  # what follows `nemo-quant`: the command and its Hydra overrides
    nodes: int = 1
    procs_per_node: int = 1
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    gpus_per_node: int | None = None
    job_name: str = "nemo-quant"
    output: str = "nemo-quant-%j.out"
    signal_grace_s: int = 120  # how long before the time limit (or a preemption) the warning comes
    python: str = sys.executable  # the interpreter (environment) every node runs
    sbatch_options: list[str] = field(default_factory=list)  # further `#SBATCH` lines, e.g. --exclusive


def check_job(job: SlurmJob) -> None:
    """Refuse, before submission, a layout the job cannot run or a training job that cannot resume."""
    if job.nodes < 1 or job.procs_per_node < 1:
        raise ConfigError(f"--nodes {job.nodes} --procs-per-node {job.procs_per_node}: both must be at least 1.")
    if job.signal_grace_s < 1:
        raise ConfigError(f"--signal-grace {job.signal_grace_s}: must be at least 1 second.")
    if not job.args:
        raise ConfigError("no nemo-quant command after `--` (e.g. `-- train quant=fp8 checkpoint.save=/shared/run`).")
    cfg = compose_command(job.args)  # bad overrides fail here, before submission
    world = job.nodes * job.procs_per_node
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    if world % (tp * pp):
        raise ConfigError(
            f"{job.nodes} nodes x {job.procs_per_node} processes = {world} ranks, which parallel.tp={tp} x "
            f"parallel.pp={pp} = {tp * pp} does not divide (world = tp x pp x dp): change --nodes, "
            f"--procs-per-node or parallel.tp/parallel.pp.")
    if cfg.command == "train" and (cfg.checkpoint.save is None or not cfg.train.resume):
        raise ConfigError("train under Slurm needs checkpoint.save=<a directory every node sees> and "
                          "train.resume=true: a preempted or requeued job resumes from there.")


def render(job: SlurmJob) -> str:
    """The sbatch script for `job`."""
    options = [f"--job-name={job.job_name}", f"--nodes={job.nodes}", "--ntasks-per-node=1",
               f"--output={job.output}", "--open-mode=append", "--requeue", f"--signal=B:USR1@{job.signal_grace_s}"]
    options += [f"--{k}={v}" for k, v in (("time", job.time), ("partition", job.partition),
                                          ("account", job.account), ("gpus-per-node", job.gpus_per_node)) if v]
    options += job.sbatch_options
    # Expanded on each node by the task's shell: $SLURM_NODEID is that node's rank.
    per_node = (f'exec {shlex.quote(job.python)} -m torch.distributed.run --nnodes "$SLURM_NNODES" '
                f'--node-rank "$SLURM_NODEID" --nproc-per-node {job.procs_per_node} '
                f'--master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" -m nemo_quant.cli.main '
                + " ".join(shlex.quote(a) for a in job.args))
    return "\n".join([
        "#!/bin/bash",
        *(f"#SBATCH {o}" for o in options),
        "set -u",
        'first="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_ADDR=\"$(scontrol show node \"$first\" | tr ' ' '\\n' | sed -n 's/^NodeAddr=//p')\"",
        "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        f'export {PREEMPT_FILE_ENV}="$SLURM_SUBMIT_DIR/.nemo-quant-preempt-$SLURM_JOB_ID"',
        f'rm -f "${PREEMPT_FILE_ENV}"',
        f"trap 'echo \"nemo-quant-slurm: preemption warning: checkpointing\"; touch \"${PREEMPT_FILE_ENV}\"' USR1",
        f"echo \"nemo-quant-slurm: job $SLURM_JOB_ID restart ${{SLURM_RESTART_COUNT:-0}} on $SLURM_JOB_NODELIST, "
        f"rendezvous $MASTER_ADDR:$MASTER_PORT\"",
        f"srun --kill-on-bad-exit=1 --ntasks-per-node=1 bash -c {shlex.quote(per_node)} &",
        'step=$!',
        'wait "$step"; rc=$?',
        'while kill -0 "$step" 2>/dev/null; do wait "$step"; rc=$?; done  # the trap interrupted wait',
        f'if [ -e "${PREEMPT_FILE_ENV}" ]; then',
        f'  rm -f "${PREEMPT_FILE_ENV}"',
        '  echo "nemo-quant-slurm: requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "  exit 0",
        "fi",
        'exit "$rc"',
        ""])


def submit(script: Path) -> str:
    """`sbatch` the script; the job id."""
    proc = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"sbatch {script} failed: {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog="nemo-quant-slurm", description=__doc__.split("\n\n")[0],
                                     epilog="Everything after `--` is the nemo-quant command and its overrides.")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--procs-per-node", type=int, default=1, help="ranks per node (GPUs per node)")
    parser.add_argument("--time"), parser.add_argument("--partition"), parser.add_argument("--account")
    parser.add_argument("--gpus-per-node", type=int)
    parser.add_argument("--job-name", default="nemo-quant")
    parser.add_argument("--output", default="nemo-quant-%j.out")
    parser.add_argument("--signal-grace", type=int, default=120, help="seconds of warning before the time limit")
    parser.add_argument("--sbatch-option", action="append", default=[], help="a further #SBATCH option")
    parser.add_argument("--script", type=Path, default=Path("nemo-quant.sbatch"), help="where the script is written")
    parser.add_argument("--dry-run", action="store_true", help="write and print the script, do not submit")
    ns = parser.parse_args(own)
    job = SlurmJob(args, ns.nodes, ns.procs_per_node, ns.time, ns.partition, ns.account, ns.gpus_per_node,
                   ns.job_name, ns.output, ns.signal_grace, sbatch_options=ns.sbatch_option)
    try:
        check_job(job)
    except ConfigError as e:
        print(f"nemo-quant-slurm: {e}", file=sys.stderr)
        return 2
    ns.script.write_text(render(job))
    if ns.dry_run:
        print(ns.script.read_text())
        return 0
    print(f"nemo-quant-slurm: submitted job {submit(ns.script)} ({ns.script})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
