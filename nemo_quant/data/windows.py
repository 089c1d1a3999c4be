"""Token windows for calibration and evaluation, as BENCHMARKS.md defines them."""
from __future__ import annotations

import hashlib

import torch


def token_windows(ids: list[int] | torch.Tensor, count: int, seq_length: int, what: str = "data") -> torch.Tensor:
    """The first `count` non-overlapping windows of `seq_length` tokens, as int64 [count, seq_length]."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    needed = count * seq_length
    if ids.numel() < needed:
        raise ValueError(
            f"{what}: {ids.numel()} tokens is fewer than {count} windows x {seq_length} tokens; "
            f"lower data.{'calib' if what == 'calibration' else 'eval'}_samples or data.seq_length."
        )
    return ids[:needed].reshape(count, seq_length).clone()


def fingerprint(windows: torch.Tensor) -> str:
    """First 16 hex digits of sha256 over the int64 bytes: proves two runs fed identical data."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:16]
