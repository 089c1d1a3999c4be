"""Stream tensors into safetensors files one at a time, split into shards by size.

`safetensors.torch.save_file` needs every tensor in memory at once; an export that gathers
a model layer by layer must not hold it all. The safetensors layout is: 8-byte little-endian
header length N, an N-byte JSON header `{name: {dtype, shape, data_offsets}}` that may be
padded with trailing spaces, then the raw bytes. So each file reserves `header_reserve`
bytes up front, streams every tensor's bytes behind that reservation as it arrives, and
writes the header (space-padded to the reservation) once the file is complete. A header
that outgrows the reservation is written in front of a copy of the data (in the kernel).
Files written here are read back with the `safetensors` library in the tests.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int8: "I8", torch.uint8: "U8",
    torch.int32: "I32", torch.int64: "I64", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_ALIGN = 8  # the header is padded with spaces so the data starts 8-byte aligned


def tensor_buffer(t: torch.Tensor):
    """The tensor's bytes as a buffer (no copy when already contiguous on the CPU)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


HEADER_RESERVE = 1 << 20  # 1 MiB: about 8000 tensor entries


def _copy_range(src, dst, offset: int, count: int) -> None:
    """Append bytes [offset, offset + count) of `src` to `dst`, in the kernel where possible."""
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), count - done, offset + done)
        except OSError:
            if done:
                raise
            src.seek(offset)
            shutil.copyfileobj(src, dst, length=16 << 20)
            return
        if n == 0:
            raise OSError(f"{src.name}: data ended after {done} of {count} bytes")
        done += n


class SafetensorsFile:
    """One safetensors file written tensor by tensor (`add`), completed by `close`."""

    def __init__(self, path: Path, metadata: dict[str, str] | None = None, header_reserve: int = HEADER_RESERVE):
        self.path = Path(path)
        self._reserve = header_reserve
        self._file = open(self.path, "wb")
        self._file.seek(header_reserve)
        self._header: dict[str, dict] = {}
        self._metadata = metadata
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._header:
            raise ValueError(f"{self.path.name}: tensor {name!r} written twice")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise TypeError(f"{name}: dtype {tensor.dtype} has no safetensors encoding")
        raw = tensor_buffer(tensor)
        self._file.write(raw)
        self._header[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape),
                              "data_offsets": [self.nbytes, self.nbytes + raw.nbytes]}
        self.nbytes += raw.nbytes

    def names(self) -> list[str]:
        return list(self._header)

    def close(self) -> None:
        header = dict(self._header)
        if self._metadata:
            header["__metadata__"] = self._metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        if 8 + len(encoded) <= self._reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserve - 8) + encoded.ljust(self._reserve - 8, b" "))
            self._file.close()
            return
        # The header outgrew the reservation: header first, then the data moved behind it.
        self._file.close()
        encoded += b" " * (-(len(encoded) + 8) % _ALIGN)
        moved = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, "rb") as data, open(moved, "wb") as out:
            out.write(struct.pack("<Q", len(encoded)) + encoded)
            out.flush()
            _copy_range(data, out, self._reserve, self.nbytes)
        moved.replace(self.path)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class ShardedWriter:
    """`<prefix>.safetensors`, or `<prefix>-0000k-of-0000n.safetensors` + `<prefix>.safetensors.index.json`
    when the tensors exceed `max_shard_bytes` (a shard is closed before it would grow past it)."""

    def __init__(self, directory: Path, prefix: str = "model", max_shard_bytes: int = 0, metadata: dict | None = None):
        self.directory, self.prefix, self.max_shard_bytes = Path(directory), prefix, max_shard_bytes
        self._metadata = metadata
        self._closed: list[SafetensorsFile] = []
        self._current: SafetensorsFile | None = None
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self._current is not None and self.max_shard_bytes and self._current.nbytes and \
                self._current.nbytes + size > self.max_shard_bytes:
            self._current.close()
            self._closed.append(self._current)
            self._current = None
        if self._current is None:
            part = self.directory / f"{self.prefix}.part{len(self._closed) + 1}.safetensors"
            self._current = SafetensorsFile(part, self._metadata)
        self._current.add(name, tensor)
        self.total_bytes += size

    def close(self) -> list[Path]:
        """Finish the last shard and give every shard its final name; returns the files."""
        if self._current is not None:
            self._current.close()
            self._closed.append(self._current)
            self._current = None
        n = len(self._closed)
        if n == 1:
            final = [self.directory / f"{self.prefix}.safetensors"]
        else:
            final = [self.directory / f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for shard, path in zip(self._closed, final):
            shard.path.rename(path)
        if n > 1:
            weight_map = {name: path.name for shard, path in zip(self._closed, final) for name in shard.names()}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            (self.directory / f"{self.prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return final

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
