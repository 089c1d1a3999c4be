"""A small reader for R's lazy-load databases (`*.rdb` + `*.rdx`) in pure Python.

An `.rdx` file is a gzip-compressed R serialization of
`list(variables = list(name = c(offset, length)), references = ..., compressed = ...)`;
each variable is a record at `offset` in the `.rdb`: a 4-byte big-endian uncompressed size,
then (for compression type 1) zlib data holding one serialized R object.
Only the value types data packages use are decoded: vectors, lists, pairlists, symbols,
attributes, NULL; environments and closures are rejected.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

NILSXP, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP = 0, 1, 2, 9, 10, 13, 14, 16, 19
REFSXP, NILVALUE_SXP = 255, 254
NA_INTEGER = -(2**31)


class RDataError(ValueError):
    pass


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise RDataError("only XDR (big-endian binary) R serialization is supported")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader R versions
        if version == 3:
            name_length = self.int()  # native encoding name follows
            self.pos += name_length
        elif version != 2:
            raise RDataError(f"R serialization version {version} is not supported")

    def int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def length(self) -> int:
        n = self.int()
        if n == -1:
            hi, lo = self.int(), self.int()
            n = (hi << 32) | (lo & 0xFFFFFFFF)
        return n

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (NILVALUE_SXP, NILSXP):
            return None
        if kind == REFSXP:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == LISTSXP:
            if has_attr:
                self.item()  # pairlist attributes carry nothing data packages need
            tag = self.item() if has_tag else None
            out = {tag if tag is not None else 0: self.item()}
            rest = self.item()
            if isinstance(rest, dict):
                out.update(rest)
            return out
        if kind == CHARSXP:
            n = self.int()
            if n == -1:
                return None
            s = self.data[self.pos:self.pos + n].decode("utf-8", errors="replace")
            self.pos += n
            return s
        if kind in (LGLSXP, INTSXP):
            n = self.length()
            vals = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
            value = [None if v == NA_INTEGER else v for v in vals]
        elif kind == REALSXP:
            n = self.length()
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind == STRSXP:
            value = [self.item() for _ in range(self.length())]
        elif kind == VECSXP:
            value = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"R object type {kind} is not supported by this reader")
        if has_attr:
            attrs = self.item()
            names = attrs.get("names") if isinstance(attrs, dict) else None
            if kind == VECSXP and names:
                value = dict(zip(names, value, strict=True))
        return value


def unserialize(data: bytes):
    """Decode one R object from its XDR serialization."""
    return _Reader(data).item()


def read_lazyload_db(stem: str | Path) -> dict[str, object]:
    """Read every variable of an R lazy-load database given its path without extension."""
    stem = Path(stem)
    index = unserialize(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    if index.get("compressed") not in ([True], [1], None):
        raise RDataError(f"{stem}: only zlib-compressed lazy-load databases are supported")
    blob = stem.with_suffix(".rdb").read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        record = blob[int(offset):int(offset) + int(length)]
        out[name] = unserialize(zlib.decompress(record[4:]))
    return out
