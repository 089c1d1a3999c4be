"""Progress bars that only rank 0 draws, so multi-rank logs stay readable."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def quiet() -> bool:
    """True on ranks other than 0, or when NEMO_QUANT_QUIET=1 (the tests set it)."""
    return int(os.environ.get("RANK", "0")) != 0 or os.environ.get("NEMO_QUANT_QUIET") == "1"


def progress(total: int, desc: str, unit: str = "it"):
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet(), file=sys.stderr, dynamic_ncols=True)
