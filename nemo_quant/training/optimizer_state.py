"""Optimizer state as safetensors (tensors) + JSON (hyper-parameters): resumable, never pickled."""
from __future__ import annotations

import json
from pathlib import Path

import torch


def save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    save_file(tensors, str(directory / f"optimizer.rank{rank}.safetensors"))
    (directory / f"optimizer.rank{rank}.json").write_text(json.dumps({"param_groups": state["param_groups"], "scalars": scalars}))


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, rank: int) -> None:
    from safetensors.torch import load_file

    tensor_file = directory / f"optimizer.rank{rank}.safetensors"
    if not tensor_file.is_file():
        raise FileNotFoundError(f"{tensor_file} missing: the checkpoint was written with another number of ranks; "
                                "resume with the same parallel layout (model weights reshard, optimizer state does not).")
    meta = json.loads((directory / f"optimizer.rank{rank}.json").read_text())
    state: dict[int, dict] = {}
    for name, value in load_file(str(tensor_file)).items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
