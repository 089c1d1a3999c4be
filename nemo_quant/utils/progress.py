"""Progress bars that only rank 0 draws, so multi-rank logs stay readable."""
from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "it"):
    rank = int(os.environ.get("RANK", "0"))
    quiet = rank != 0 or os.environ.get("NEMO_QUANT_QUIET") == "1"
    return tqdm(total=total, desc=desc, unit=unit, disable=quiet, file=sys.stderr, dynamic_ncols=True)
