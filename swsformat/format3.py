"""Format version 3: a compact binary index in front of the payload (SPEC.md sections 8-9).

The index replaces version 2's msgpack header: varints, names stored as a shared prefix
plus suffix, codebooks shared by reference, aliases for tied tensors, no offsets (they
follow from the lengths) and one CRC-32 per tensor. It is parsed into the same
:class:`~swsformat.container.Entry` objects as versions 1 and 2, so everything after the
header (layout checks, payload reads, kernels) is shared.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import msgpack
import numpy as np

from .errors import SwsFormatError, where
from .spec import (
    MAX_CODEBOOK,
    MAX_HEADER,
    MAX_INDEX_BITS,
    MAX_NAME,
    MAX_NDIM,
    MAX_ROW_BITS,
    MAX_TENSORS,
    RAW_DTYPES,
    SWS_DTYPES,
    codebook_problem,
    matrix_shape,
    pack_nibbles,
)

VERSION = 3
DTYPE_CODES = list(RAW_DTYPES)  # dtype byte -> name, in SPEC.md's order
KIND_RAW, KIND_HUFFMAN, KIND_CONTEXT, KIND_ALIAS, KIND_COUNTING, KIND_SPARSE_RAW = 0, 1, 2, 3, 4, 5
MAX_VARINT_BYTES = 10
INT64_MAX = (1 << 63) - 1


# ------------------------------------------------------------------------------ writing


def varint(n: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first."""
    if n < 0:
        raise ValueError(f"varint of negative {n}")
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _text(s: str) -> bytes:
    raw = s.encode("utf-8")
    return varint(len(raw)) + raw


def shared_ends(name: bytes, previous: bytes) -> tuple[int, int]:
    """(bytes of ``name`` equal to the start of ``previous``, then to its end): the longest
    common prefix, then the longest common suffix of what remains of both."""
    n = min(len(name), len(previous))
    lo, hi = 0, n  # binary search over slice comparisons (each in C): O(n log n) bytes, no Python loop per byte
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if name[:mid] == previous[:mid]:
            lo = mid
        else:
            hi = mid - 1
    p = lo
    lo, hi = 0, n - p
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if name[len(name) - mid :] == previous[len(previous) - mid :]:
            lo = mid
        else:
            hi = mid - 1
    return p, lo


def pack_index(library: str, architecture: dict[str, Any] | None, metadata: dict[str, str],
               records: list[bytes]) -> bytes:
    """The index bytes: file facts, then the tensor records (built by :func:`tensor_record`)."""
    arch = b"" if architecture is None else msgpack.packb(architecture, use_bin_type=True)
    out = bytearray(_text(library) + varint(len(arch)) + arch + varint(len(metadata)))
    for k, v in metadata.items():
        out += _text(k) + _text(v)
    out += varint(len(records))
    for r in records:
        out += r
    return bytes(out)


def tensor_record(name: bytes, previous: bytes, kind: int, fields: bytes) -> bytes:
    """One tensor's record: its name as the bytes it shares with the start and the end of the
    previous name and what lies between (``layers.1.fc.weight`` after ``layers.0.fc.weight``
    costs one byte of text), then its kind and fields."""
    p, q = shared_ends(name, previous)
    mid = name[p : len(name) - q]
    return varint(p) + varint(q) + varint(len(mid)) + mid + bytes([kind]) + fields


def shape_fields(dtype: str, shape: tuple[int, ...]) -> bytes:
    return bytes([DTYPE_CODES.index(dtype), len(shape)]) + b"".join(varint(s) for s in shape)


def huffman_fields(index_bits: int, entries: int, row_bits: int, gap_lengths: np.ndarray, gap_bits: int,
                   value_lengths: np.ndarray, value_bits: int) -> bytes:
    return (bytes([index_bits]) + varint(entries) + bytes([row_bits]) + pack_nibbles(gap_lengths)
            + varint(gap_bits) + pack_nibbles(value_lengths) + varint(value_bits))


def codebook_fields(codebook: np.ndarray, dtype: str, ref: int | None) -> bytes:
    """``0, count, patterns`` for an own codebook, ``r + 1`` to reuse tensor ``r``'s."""
    if ref is not None:
        return varint(ref + 1)
    return varint(0) + varint(codebook.size) + codebook.astype(SWS_DTYPES[dtype]).tobytes()


# ------------------------------------------------------------------------------ reading


class Cursor:
    """Bounds-checked reads from the index bytes; every failure names the tensor and field."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0
        self.tensor: str | None = None

    def fail(self, field: str, what: str) -> SwsFormatError:
        return SwsFormatError(f"{where(self.tensor, field)}{what} (index byte {self.pos})")

    def take(self, n: int, field: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(field, f"needs {n} bytes, the index ends {len(self.data) - self.pos} bytes later")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u32(self, field: str) -> int:
        return struct.unpack("<I", self.take(4, field))[0]

    def varint(self, field: str, hi: int = INT64_MAX) -> int:
        n = shift = 0
        for i in range(MAX_VARINT_BYTES):
            b = self.u8(field)
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and i > 0:
                    raise self.fail(field, "varint has a redundant zero byte (not canonical)")
                if n > hi:
                    raise self.fail(field, f"{n} exceeds the limit of {hi}")
                return n
            shift += 7
        raise self.fail(field, f"varint longer than {MAX_VARINT_BYTES} bytes")

    def text(self, field: str, max_len: int = MAX_NAME) -> str:
        raw = self.take(self.varint(field, max_len * 4), field)
        try:
            s = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(field, "is not valid UTF-8") from None
        if len(s) > max_len:
            raise self.fail(field, f"string of {len(s)} characters exceeds {max_len}")
        return s


def read_shape(cur: Cursor) -> tuple[str, tuple[int, ...]]:
    code = cur.u8("dtype")
    if code >= len(DTYPE_CODES):
        raise cur.fail("dtype", f"dtype code {code} is not one of 0..{len(DTYPE_CODES) - 1}")
    ndim = cur.u8("shape")
    if ndim > MAX_NDIM:
        raise cur.fail("shape", f"{ndim} dimensions, at most {MAX_NDIM}")
    shape = []
    span = RAW_DTYPES[DTYPE_CODES[code]].itemsize
    for _ in range(ndim):
        s = cur.varint("shape")
        span *= max(s, 1)
        if span > 1 << 62:
            raise cur.fail("shape", "sizes overflow int64 byte strides (product times the item size over 2**62)")
        shape.append(s)
    return DTYPE_CODES[code], tuple(shape)


def read_codebook(cur: Cursor, dtype: str, codebooks: list[tuple[str, np.ndarray] | None]) -> np.ndarray:
    ref = cur.varint("codebook", len(codebooks))
    if ref:
        shared = codebooks[ref - 1]
        if shared is None or shared[0] != dtype:
            raise cur.fail("codebook", f"refers to tensor #{ref - 1}, which has no {dtype} codebook")
        return shared[1]
    n = cur.varint("codebook", MAX_CODEBOOK)
    pat = SWS_DTYPES[dtype]
    cb = np.frombuffer(cur.take(n * pat.itemsize, "codebook"), dtype=pat)
    wrong = codebook_problem(cb, dtype)
    if wrong is not None:
        raise cur.fail("codebook", wrong)
    return cb


def read_huffman(cur: Cursor, rows: int, numel: int, nonzeros: int, alphabet_values: int) -> dict[str, Any]:
    index_bits = cur.u8("index_bits")
    if not 1 <= index_bits <= MAX_INDEX_BITS:
        raise cur.fail("index_bits", f"{index_bits} is not in [1, {MAX_INDEX_BITS}]")
    entries = cur.varint("entries", nonzeros + numel // (1 << index_bits) + rows)
    if entries < nonzeros:
        raise cur.fail("entries", f"{entries} entries cannot hold {nonzeros} non-zeros")
    row_bits = cur.u8("row_bits")
    if row_bits > MAX_ROW_BITS or (entries and row_bits == 0):
        raise cur.fail("row_bits", f"{row_bits} is not in [{1 if entries else 0}, {MAX_ROW_BITS}]")
    gap_code = cur.take(((1 << index_bits) + 1) // 2, "gaps")
    gap_bits = cur.varint("gaps")
    value_code = cur.take((alphabet_values + 1) // 2, "values")
    value_bits = cur.varint("values")
    return dict(index_bits=index_bits, entries=entries, row_bits=row_bits, gap_code=gap_code, gap_bits=gap_bits,
                value_code=value_code, value_bits=value_bits)


def read_index_records(index: bytes) -> tuple[str, dict[str, Any] | None, dict[str, str], list[dict[str, Any]], Cursor]:
    """Decode the index bytes into file facts and one dict per tensor (fields still unchecked
    against each other; :func:`swsformat.container.check_index3` does that)."""
    from .container import unpack_header

    cur = Cursor(index)
    library = cur.text("library")
    arch_len = cur.varint("architecture", len(index))
    arch = None
    if arch_len:
        arch = unpack_header(cur.take(arch_len, "architecture"))
        if not isinstance(arch, dict) or arch.keys() != {"name", "kwargs"} or not isinstance(arch["name"], str) \
                or len(arch["name"]) > MAX_NAME or not isinstance(arch["kwargs"], dict):
            raise cur.fail("architecture", "is not a map of 'name' (string) and 'kwargs' (map)")
    meta: dict[str, str] = {}
    for _ in range(cur.varint("metadata", len(index) // 2)):
        k = cur.text("metadata key")
        if k in meta:
            raise cur.fail("metadata", f"duplicate key {k!r}")
        meta[k] = cur.text("metadata value", len(index))
    count = cur.varint("tensors", MAX_TENSORS)
    records = []
    codebooks: list[tuple[str, np.ndarray] | None] = []  # per record, for references
    previous = b""
    name_bytes = 0
    for i in range(count):
        start = cur.pos
        cur.tensor = f"#{i}"
        p = cur.varint("name", len(previous))
        q = cur.varint("name", len(previous) - p)
        mid = cur.take(cur.varint("name", MAX_NAME * 4), "name")
        raw_name = previous[:p] + mid + previous[len(previous) - q :]
        # Shared ends make long names cheap to store; what they expand to is bounded like a
        # version 2 header, which holds every name in full.
        name_bytes += len(raw_name)
        if name_bytes > MAX_HEADER:
            raise cur.fail("name", f"names add up to more than {MAX_HEADER} bytes")
        if shared_ends(raw_name, previous) != (p, q):
            raise cur.fail("name", "its shared prefix and suffix lengths are not the longest ones (not canonical)")
        try:
            name = raw_name.decode("utf-8")
        except UnicodeDecodeError:
            raise cur.fail("name", "is not valid UTF-8") from None
        if len(name) > MAX_NAME:
            raise cur.fail("name", f"name of {len(name)} characters exceeds {MAX_NAME}")
        previous = raw_name
        cur.tensor = name
        rec: dict[str, Any] = {"name": name, "kind": cur.u8("kind")}
        if rec["kind"] == KIND_ALIAS:
            rec["target"] = cur.varint("alias", INT64_MAX)
        elif rec["kind"] == KIND_SPARSE_RAW:
            rec["dtype"], rec["shape"] = read_shape(cur)
            rec["nonzeros"] = cur.varint("nonzeros", numel(rec["shape"]))
            rec["length"] = cur.varint("positions")
            rec["crc"] = cur.u32("crc")
        elif rec["kind"] in (KIND_RAW, KIND_HUFFMAN, KIND_CONTEXT, KIND_COUNTING):
            rec["dtype"], rec["shape"] = read_shape(cur)
            if rec["kind"] != KIND_RAW:
                if rec["dtype"] not in SWS_DTYPES:
                    raise cur.fail("dtype", f"{rec['dtype']} cannot be coded (one of {sorted(SWS_DTYPES)})")
                rec["codebook"] = read_codebook(cur, rec["dtype"], codebooks)
                rec["codebook_of"] = (rec["dtype"], rec["codebook"])
                rows, cols = matrix_shape(rec["shape"])
                rec["nonzeros"] = cur.varint("nonzeros", rows * cols)
                if rec["nonzeros"] and rec["codebook"].size == 0:
                    raise cur.fail("codebook", f"is empty but the tensor has {rec['nonzeros']} non-zeros")
                if rec["kind"] == KIND_HUFFMAN:
                    rec.update(read_huffman(cur, rows, rows * cols, rec["nonzeros"], rec["codebook"].size + 1))
                else:
                    rec["length"] = cur.varint("payload")
            rec["crc"] = cur.u32("crc")
        else:
            raise cur.fail("kind", f"{rec['kind']} is not 0 (raw), 1 (huffman), 2 or 4 (context), 3 (alias) "
                                   "or 5 (sparse raw)")
        rec["index_bytes"] = cur.pos - start
        records.append(rec)
        codebooks.append(rec.get("codebook_of"))
    cur.tensor = None
    if cur.pos != len(index):
        raise cur.fail("index", f"{len(index) - cur.pos} bytes after the last tensor record")
    return library, arch, meta, records, cur


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
