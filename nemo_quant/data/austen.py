"""The Jane Austen corpus from Debian's `r-cran-janeaustenr`, fetched once and cached as text.

Debian ships the six public-domain novels inside R's lazy-load database; we download the
.deb (no R needed), unpack it and decode the database with `nemo_quant.data.rdata`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from nemo_quant.data.rdata import read_lazyload_db
from nemo_quant.utils.cache import cache_root

PACKAGE = "r-cran-janeaustenr"
RDATA_STEM = "usr/lib/R/site-library/janeaustenr/data/Rdata"
# Protocol order (BENCHMARKS.md): five calibration novels, then the evaluation novel.
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


class CorpusUnavailable(RuntimeError):
    pass


def cache_dir() -> Path:
    return cache_root() / "janeaustenr"


def _manual_steps(target: Path) -> str:
    return (
        f"Fetch it by hand: `apt-get update && apt-get download {PACKAGE} && "
        f"dpkg-deb -x {PACKAGE}_*.deb /tmp/ja`, then set NEMO_QUANT_JANEAUSTENR_DIR=/tmp/ja "
        f"(cache: {target})."
    )


def _download_deb(workdir: Path) -> Path:
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise CorpusUnavailable(f"apt-get/dpkg-deb not found; cannot fetch {PACKAGE}. " + _manual_steps(cache_dir()))
    result = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True, text=True)
    debs = list(workdir.glob(f"{PACKAGE}_*.deb"))
    if result.returncode != 0 or not debs:
        raise CorpusUnavailable(
            f"`apt-get download {PACKAGE}` failed ({result.stderr.strip()[-300:]}). If the package "
            "lists are empty, run `apt-get update` first. " + _manual_steps(cache_dir())
        )
    return debs[0]


def _extract(workdir: Path) -> Path:
    unpacked = os.environ.get("NEMO_QUANT_JANEAUSTENR_DIR")
    if unpacked:
        return Path(unpacked)
    deb = _download_deb(workdir)
    root = workdir / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


def novels() -> dict[str, str]:
    """Each novel's text (lines joined with newlines), in protocol order; cached after first use."""
    target = cache_dir()
    if not all((target / f"{n}.txt").is_file() for n in NOVELS):
        with tempfile.TemporaryDirectory() as tmp:
            data = read_lazyload_db(_extract(Path(tmp)) / RDATA_STEM)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent))  # same filesystem: the move is a rename
            for name in NOVELS:
                (staging / f"{name}.txt").write_text("\n".join(data[name]), encoding="utf-8")
            if target.exists():
                shutil.rmtree(target)
            shutil.move(str(staging), target)
    return {n: (target / f"{n}.txt").read_text(encoding="utf-8") for n in NOVELS}


def calibration_text() -> str:
    texts = novels()
    return "\n\n".join(texts[n] for n in NOVELS[:5])


def evaluation_text() -> str:
    return novels()["persuasion"]


if __name__ == "__main__":
    # `python -m nemo_quant.data.austen`: fetch and cache the corpus (used by `make setup`).
    sizes = {name: len(text) for name, text in novels().items()}
    print(f"Austen corpus cached in {cache_dir()}: " + ", ".join(f"{k} {v}" for k, v in sizes.items()))
