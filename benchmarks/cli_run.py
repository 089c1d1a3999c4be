"""One benchmark step = the command a user runs, in its own process, read back from results.json."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def run_cli(args: list[str], run_dir: Path) -> dict:
    """`nemo-quant <args>` with its Hydra run dir at run_dir; its results.json plus the wall time."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "nemo_quant.cli.main", *args, f"hydra.run.dir={run_dir}"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    result = json.loads((run_dir / "results.json").read_text())
    result["wall_s"] = time.perf_counter() - start
    return result
