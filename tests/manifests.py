"""Checkpoint manifests (configs + safetensors headers, no data): materialised as files with
zero-filled data so the validator reads them like any checkpoint, and compared with ours."""
from __future__ import annotations

import json
import struct
from pathlib import Path

DATA = Path(__file__).parent / "data" / "modelopt_manifests.json"
SIZES = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "F8_E4M3": 1}


def modelopt_manifests() -> dict:
    return json.loads(DATA.read_text())


def materialise(entry: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, config in entry["configs"].items():
        (directory / name).write_text(json.dumps(config))
    for fname, tensors in entry["tensors"].items():
        header, offset = {}, 0
        for name, (dtype, shape) in tensors.items():
            n = SIZES[dtype]
            for s in shape:
                n *= s
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return directory


def manifest_of(directory: Path) -> dict[str, dict[str, tuple[str, list[int]]]]:
    from nemo_quant.export.validate import read_header

    return {f.name: {k: (v["dtype"], v["shape"]) for k, v in read_header(f).items()}
            for f in sorted(Path(directory).glob("*.safetensors"))}
