"""Progress bars that only rank 0 draws, so multi-rank logs stay readable.

On a terminal: a tqdm bar. Into a file or a pipe (a SLURM log, CI): a carriage-return bar
would write thousands of updates into one line, so plain lines are printed instead, at most
one per tenth of the work or per `PLAIN_EVERY_S` seconds, and one at the end.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm.auto import tqdm

PLAIN_EVERY_S = 30.0


def quiet() -> bool:
    """True on ranks other than 0, or when NEMO_QUANT_QUIET=1 (the tests set it)."""
    return int(os.environ.get("RANK", "0")) != 0 or os.environ.get("NEMO_QUANT_QUIET") == "1"


class PlainProgress:
    """tqdm's update / set_postfix / close, as sparse plain lines."""

    def __init__(self, total: int, desc: str, unit: str, stream=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()
        self.step = max(1, total // 10)
        self.postfix = ""
        self.reported = 0  # n at the last line printed

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.monotonic()
        if self.n // self.step > before // self.step or now - self.last >= PLAIN_EVERY_S:
            self._line(now)

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if self.n != self.reported:
            self._line(time.monotonic())

    def _line(self, now: float) -> None:
        self.last, self.reported = now, self.n
        elapsed = now - self.start
        rate = f", {self.n / elapsed:.2f} {self.unit}/s" if elapsed > 0 else ""
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({elapsed:.0f} s{rate}{extra})", file=self.stream, flush=True)


def progress(total: int, desc: str, unit: str = "it"):
    if not quiet() and not sys.stderr.isatty():
        return PlainProgress(total, desc, unit)
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet(), file=sys.stderr, dynamic_ncols=True)
