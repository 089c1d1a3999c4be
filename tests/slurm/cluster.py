"""A two-node Slurm cluster on this machine (Debian's slurm-wlm + munge): munged, slurmctld and
two slurmd (`-N node1`, `-N node2`), all state, logs and pid files in one scratch folder.
`stop()` ends exactly the daemons `start()` started."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("node1", "node2")


def _conf(root: Path, host: str) -> str:
    lines = [
        "ClusterName=nqtest", f"SlurmctldHost={host}(127.0.0.1)", "SlurmctldPort=16817",
        "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge", "MpiDefault=none",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU", "SchedulerType=sched/backfill", "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "JobRequeue=1",
        "SlurmctldTimeout=30", "SlurmdTimeout=30", "MinJobAge=600", "KillWait=5",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.%n.log",
    ]
    cpus = os.cpu_count() or 2
    for i, node in enumerate(NODES):
        lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={17001 + i} CPUs={cpus} "
                     f"RealMemory=2000 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


@dataclass
class Cluster:
    root: Path
    started: list[tuple[str, Path | int]] = field(default_factory=list)  # (what, pid file or pid)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.root / "slurm.conf")}

    def run(self, *cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=60)
        if check and proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
        return proc.stdout

    def start(self) -> "Cluster":
        missing = [t for t in ("munged", "slurmctld", "slurmd", "sbatch") if not shutil.which(t)]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed: `make test-slurm` installs Debian's slurm-wlm and munge")
        host = socket.gethostname().split(".")[0]
        for d in ("state", "spool"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "slurm.conf").write_text(_conf(self.root, host))
        if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode:
            Path("/run/munge").mkdir(exist_ok=True)  # munged's socket folder (systemd would make it)
            shutil.chown("/run/munge", "munge", "munge")
            subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
            self.started.append(("munged", Path("/run/munge/munged.pid")))
        subprocess.run(["slurmctld", "-f", str(self.root / "slurm.conf")], check=True, env=self.env)
        self.started.append(("slurmctld", self.root / "slurmctld.pid"))
        for node in NODES:
            subprocess.run(["slurmd", "-f", str(self.root / "slurm.conf"), "-N", node], check=True, env=self.env)
            self.started.append((f"slurmd {node}", self.root / f"slurmd.{node}.pid"))
        deadline = time.time() + 60
        while time.time() < deadline:
            states = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False).split()
            if states.count("idle") == len(NODES):
                return self
            time.sleep(1)
        raise RuntimeError(f"nodes not idle after 60 s: {states}; see {self.root}/*.log")

    def stop(self) -> None:
        for what, ref in reversed(self.started):
            try:
                pid = ref if isinstance(ref, int) else int(Path(ref).read_text().split()[0])
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            for _ in range(50):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        self.started.clear()

    def wait(self, job_id: str, timeout_s: float = 600) -> str:
        """Until the job leaves the queue for good; its final state (from scontrol, kept MinJobAge s)."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            out = self.run("scontrol", "show", "job", job_id, check=False)
            state = next((w.split("=", 1)[1] for w in out.split() if w.startswith("JobState=")), "UNKNOWN")
            if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL"):
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {state} after {timeout_s} s")
