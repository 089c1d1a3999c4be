"""The R lazy-load decoder, on a database the test serializes by hand and on the real corpus."""
import gzip
import struct
import zlib

import pytest

from nemo_quant.data.rdata import RDataError, read_lazyload_db, unserialize


def _int(v):
    return struct.pack(">i", v)


def _charsxp(s):
    if s is None:
        return _int(9) + _int(-1)
    b = s.encode()
    return _int(9 | (1 << 12)) + _int(len(b)) + b  # gp bits are ignored by the reader


def _strsxp(items):
    return _int(16) + _int(len(items)) + b"".join(_charsxp(s) for s in items)


def _header():
    return b"X\n" + _int(3) + _int(0x040201) + _int(0x030500) + _int(5) + b"UTF-8"


def _named_list(entries):
    """VECSXP with a names attribute (pairlist: tag=names symbol, value=STRSXP)."""
    body = _int(19 | (1 << 9)) + _int(len(entries)) + b"".join(v for _, v in entries)
    attrs = _int(2 | (1 << 10)) + _int(1) + _charsxp("names") + _strsxp([k for k, _ in entries]) + _int(254)
    return body + attrs


def _realsxp(values):
    return _int(14) + _int(len(values)) + struct.pack(f">{len(values)}d", *values)


def test_unserialize_character_vector_with_na():
    assert unserialize(_header() + _strsxp(["Emma", "", None, "Woodhouse"])) == ["Emma", "", None, "Woodhouse"]


def test_rejects_non_xdr_and_unsupported_types():
    with pytest.raises(RDataError, match="XDR"):
        unserialize(b"A\n" + b"\0" * 20)
    with pytest.raises(RDataError, match="type 4"):
        unserialize(_header() + _int(4))  # an environment


def test_lazyload_database_round_trip(tmp_path):
    novels = {"emma": ["EMMA", "", "By Jane Austen"], "persuasion": ["Persuasion", "Chapter 1"]}
    blob, variables = b"", []
    for name, lines in novels.items():
        payload = _header() + _strsxp(lines)
        record = struct.pack(">I", len(payload)) + zlib.compress(payload)
        variables.append((name, _realsxp([len(blob), len(record)])))
        blob += record
    index = _header() + _named_list([("variables", _named_list(variables)), ("compressed", _int(10) + _int(1) + _int(1))])
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    assert read_lazyload_db(tmp_path / "Rdata") == novels
