"""Bytes <-> plain dataclasses for ``.sws`` files (numpy and msgpack only, no torch).

:func:`serialize` lays sections out canonically; :func:`parse` validates *everything*
(prelude, header schema and ranges, section layout, checksums, cross-field sizes)
before any payload is touched, so kernels only ever see consistent inputs.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .errors import SwsChecksumError, SwsFormatError, where
from .spec import (
    CODER_HUFFMAN,
    FORMAT_VERSION,
    HEADER_DEFLATE,
    HEADER_MSGPACK,
    MAGIC,
    MAX_CODE_LENGTH,
    MAX_CODEBOOK,
    MAX_HEADER,
    MAX_INDEX_BITS,
    MAX_NAME,
    MAX_NDIM,
    MAX_ROW_BITS,
    PRELUDE,
    RAW_DTYPES,
    SWS_DTYPES,
    VERSIONS,
    align,
    matrix_shape,
    pack_nibbles,
    unpack_nibbles,
)

Buffer = bytes | bytearray | memoryview
INT64_MAX = (1 << 63) - 1


@dataclass
class Stream:
    """An entropy-coded symbol stream: its coder id, code lengths, bit count and bytes."""

    code_lengths: np.ndarray
    bits: int
    data: np.ndarray
    coder: str = CODER_HUFFMAN


@dataclass
class SwsTensor:
    """A weight tensor coded as codebook + relative-index CSR + two Huffman streams."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    index_bits: int
    codebook: np.ndarray  # bit patterns (unsigned ints) of the non-zero values
    nonzeros: int
    entries: int
    row_bits: int
    row_counts: np.ndarray  # packed bytes
    gaps: Stream
    values: Stream
    kind: str = field(default="sws", init=False)

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)


@dataclass
class RawTensor:
    """A tensor stored as its raw little-endian bytes (biases, buffers, kept layers)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8
    kind: str = field(default="raw", init=False)


Tensor = SwsTensor | RawTensor


@dataclass
class Container:
    """A whole file: tensors in order plus file-level metadata."""

    tensors: list[Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    architecture: dict[str, Any] | None = None
    library: str = ""
    version: int = FORMAT_VERSION
    # The parsed header map, the header's size in the file and its decoded msgpack size,
    # kept by parse() so reports need not decode it a second time.
    raw_header: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    header_bytes: int = field(default=0, repr=False, compare=False)
    header_size: int = field(default=0, repr=False, compare=False)


@dataclass(frozen=True)
class Prelude:
    """The fixed-size start of a file: version, header coding and header lengths."""

    version: int
    coding: int  # HEADER_MSGPACK or HEADER_DEFLATE (always HEADER_MSGPACK in version 1)
    stored: int  # header bytes in the file
    size: int  # msgpack bytes once decoded

    @property
    def length(self) -> int:
        return PRELUDE[self.version]

    @property
    def data_start(self) -> int:
        """Offset of the data area: prelude, header and header CRC, aligned."""
        return align(self.length + self.stored + 4)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
    return c.compress(data) + c.flush()


def pack_head(header: bytes, version: int = FORMAT_VERSION, coding: int | None = None) -> bytes:
    """Prelude, header and header CRC for the msgpack bytes ``header``, padded to the data area.

    Version 2 stores the header deflated when that is smaller (``coding=None``) or as asked.
    """
    if len(header) > MAX_HEADER:
        raise SwsFormatError(f"header of {len(header)} bytes exceeds the {MAX_HEADER}-byte limit")
    if version == 1:
        if coding not in (None, HEADER_MSGPACK):
            raise ValueError("version 1 headers are plain msgpack")
        head = MAGIC + struct.pack("<HHI", 1, 0, len(header)) + header
    elif version == 2:
        if coding not in (None, HEADER_MSGPACK, HEADER_DEFLATE):
            raise ValueError(f"unknown header coding {coding}")
        stored = header
        if coding != HEADER_MSGPACK:
            packed = _deflate(header)
            if coding == HEADER_DEFLATE or len(packed) < len(header):
                stored = packed
        coding = HEADER_DEFLATE if stored is not header else HEADER_MSGPACK
        head = MAGIC + struct.pack("<HBBII", 2, coding, 0, len(stored), len(header)) + stored
    else:
        raise ValueError(f"cannot write format version {version} (versions {VERSIONS})")
    head += struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
    return head + bytes(align(len(head)) - len(head))


def _crc(data: np.ndarray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def section_start(end: int, version: int, aligned: bool) -> int:
    """Where a section begins after one ending at ``end``: version 1 aligns every section,
    version 2 only raw tensor data (coded streams are read bit by bit, never mapped)."""
    return align(end) if aligned or version == 1 else end


def serialize(c: Container) -> bytes:
    """The canonical byte form of ``c`` (deterministic for a given zlib: same container,
    same bytes; the decoded header and the data area are the same with any zlib)."""
    end = 0
    entries = []
    payload: list[tuple[int, np.ndarray]] = []

    def section(arr: np.ndarray, aligned: bool = False) -> list[int]:
        nonlocal end
        arr = np.ascontiguousarray(arr, dtype=np.uint8)
        here = section_start(end, c.version, aligned)
        payload.append((here, arr))
        end = here + arr.size
        return [here, int(arr.size), _crc(arr)]

    def stream(s: Stream) -> dict[str, Any]:
        return {
            "coder": s.coder,
            "code": pack_nibbles(s.code_lengths),
            "bits": int(s.bits),
            "section": section(s.data),
        }

    for t in c.tensors:
        e: dict[str, Any] = {"name": t.name, "kind": t.kind, "dtype": t.dtype, "shape": [int(x) for x in t.shape]}
        if isinstance(t, RawTensor):
            e["data"] = section(t.data, aligned=True)
        else:
            e.update(
                index_bits=int(t.index_bits),
                codebook=t.codebook.astype(SWS_DTYPES[t.dtype]).tobytes(),
                nonzeros=int(t.nonzeros),
                entries=int(t.entries),
                row_bits=int(t.row_bits),
                row_counts=section(t.row_counts),
                gaps=stream(t.gaps),
                values=stream(t.values),
            )
        entries.append(e)
    header = msgpack.packb(
        {
            "format": "sws",
            "version": c.version,
            "library": c.library,
            "architecture": c.architecture,
            "metadata": dict(c.metadata),
            "tensors": entries,
        },
        use_bin_type=True,
    )
    head = pack_head(header, c.version)
    data_start = len(head)
    out = bytearray(data_start + end)
    out[:data_start] = head
    for off, arr in payload:
        out[data_start + off : data_start + off + arr.size] = arr.tobytes()
    return bytes(out)


# ---------------------------------------------------------------------------- parsing


def _no_ext(code: int, data: bytes) -> Any:
    raise SwsFormatError(f"header: msgpack extension type {code} is not allowed")


def _pairs(pairs: list[tuple[Any, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if not isinstance(k, str):
            raise SwsFormatError(f"header: map key {k!r} is not a string")
        if k in out:
            raise SwsFormatError(f"header: duplicate key {k!r}")
        out[k] = v
    return out


def read_prelude(buf: Buffer) -> Prelude:
    """Validate the prelude (16 bytes in version 1, 20 in version 2)."""
    if len(buf) < PRELUDE[1]:
        raise SwsFormatError(f"file of {len(buf)} bytes is shorter than the {PRELUDE[1]}-byte prelude")
    if bytes(buf[:8]) != MAGIC:
        raise SwsFormatError("not a .sws file: bad magic bytes at offset 0")
    version = struct.unpack("<H", bytes(buf[8:10]))[0]
    if version not in VERSIONS:
        raise SwsFormatError(f"format version {version} is not supported (this reader reads {list(VERSIONS)})")
    if version == 1:
        reserved, stored = struct.unpack("<HI", bytes(buf[10:16]))
        coding, size = HEADER_MSGPACK, stored
    else:
        if len(buf) < PRELUDE[2]:
            raise SwsFormatError(f"file of {len(buf)} bytes is shorter than the {PRELUDE[2]}-byte prelude")
        coding, reserved, stored, size = struct.unpack("<BBII", bytes(buf[10:20]))
        if coding not in (HEADER_MSGPACK, HEADER_DEFLATE):
            raise SwsFormatError(f"header coding {coding} at offset 10 is not 0 (msgpack) or 1 (deflate)")
    if reserved != 0:
        raise SwsFormatError(f"reserved prelude field at offset {10 if version == 1 else 11} is {reserved}, must be 0")
    if not 1 <= stored <= MAX_HEADER:
        raise SwsFormatError(f"header length {stored} outside [1, {MAX_HEADER}]")
    if not 1 <= size <= MAX_HEADER:
        raise SwsFormatError(f"decoded header length {size} outside [1, {MAX_HEADER}]")
    if coding == HEADER_MSGPACK and size != stored:
        raise SwsFormatError(f"plain msgpack header: decoded length {size} differs from stored length {stored}")
    return Prelude(version, coding, stored, size)


def _inflate(raw: bytes, size: int) -> bytes:
    """Raw deflate -> exactly ``size`` bytes; never produces more than ``size + 1`` bytes."""
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(raw, size + 1)
    except zlib.error as exc:
        raise SwsFormatError(f"header is not a valid deflate stream: {exc}") from None
    if len(out) != size or not d.eof or d.unused_data or d.unconsumed_tail:
        raise SwsFormatError(
            f"deflated header does not decode to exactly {size} bytes in one complete stream "
            f"(got {len(out)}{'+' if d.unconsumed_tail else ''} bytes, "
            f"{'complete' if d.eof else 'unfinished'}, {len(d.unused_data)} bytes after its end)"
        )
    return out


def decode_header(buf: Buffer, prelude: Prelude) -> dict:
    """Check the header CRC, inflate it if deflated and unpack its msgpack map with
    hostile-input limits."""
    start = prelude.length
    need = start + prelude.stored + 4
    if len(buf) < need:
        raise SwsFormatError(f"file truncated inside the header: {len(buf)} bytes, header needs {need}")
    stored = struct.unpack("<I", bytes(buf[need - 4 : need]))[0]
    if zlib.crc32(bytes(buf[: need - 4])) & 0xFFFFFFFF != stored:
        raise SwsChecksumError("header CRC-32 mismatch: the header is corrupted")
    raw = bytes(buf[start : need - 4])
    if prelude.coding == HEADER_DEFLATE:
        raw = _inflate(raw, prelude.size)
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            use_list=True,
            strict_map_key=True,
            ext_hook=_no_ext,
            object_pairs_hook=_pairs,
        )
    except SwsFormatError:
        raise
    except Exception as exc:  # msgpack raises several types (ExtraData, ValueError, StackError, ...)
        raise SwsFormatError(f"header is not valid msgpack: {type(exc).__name__}: {exc}") from None
    if not isinstance(header, dict):
        raise SwsFormatError("header is not a msgpack map")
    return header


class _Check:
    """Typed access to a header map, raising SwsFormatError that names tensor and field."""

    def __init__(self, m: Any, tensor: str | None, ctx: str) -> None:
        if not isinstance(m, dict):
            raise SwsFormatError(f"{where(tensor, ctx)}expected a map, got {type(m).__name__}")
        self.m, self.tensor, self.ctx = m, tensor, ctx

    def keys(self, required: set[str]) -> None:
        got = set(self.m)
        if got != required:
            missing, extra = sorted(required - got), sorted(got - required)
            raise SwsFormatError(f"{where(self.tensor, self.ctx)}missing keys {missing}, unexpected keys {extra}")

    def int(self, key: str, lo: int, hi: int) -> int:
        v = self.m[key]
        if type(v) is not int or not lo <= v <= hi:
            raise SwsFormatError(f"{where(self.tensor, key)}{v!r} is not an integer in [{lo}, {hi}]")
        return v

    def str(self, key: str, choices: Any = None, max_len: int = MAX_NAME) -> str:
        v = self.m[key]
        if not isinstance(v, str) or len(v) > max_len or (choices is not None and v not in choices):
            allowed = f" (one of {sorted(choices)})" if choices is not None else ""
            raise SwsFormatError(f"{where(self.tensor, key)}{v!r} is not a valid string{allowed}")
        return v

    def bytes(self, key: str) -> bytes:
        v = self.m[key]
        if not isinstance(v, bytes):
            raise SwsFormatError(f"{where(self.tensor, key)}expected bytes, got {type(v).__name__}")
        return v


def _shape(v: Any, name: str) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise SwsFormatError(f"{where(name, 'shape')}expected a list of at most {MAX_NDIM} sizes")
    numel = 1
    for s in v:
        if type(s) is not int or s < 0 or s > INT64_MAX:
            raise SwsFormatError(f"{where(name, 'shape')}size {s!r} is not a non-negative integer")
        numel *= s
        if numel > INT64_MAX:
            raise SwsFormatError(f"{where(name, 'shape')}element count overflows int64")
    return tuple(v)


class _Layout:
    """Checks that sections follow each other canonically and fit the file."""

    def __init__(self, data: memoryview, verify: bool, version: int) -> None:
        self.data, self.verify, self.version, self.end = data, verify, version, 0

    def take(self, v: Any, name: str, field_name: str, aligned: bool = False) -> np.ndarray:
        if not isinstance(v, list) or len(v) != 3 or any(type(x) is not int for x in v):
            raise SwsFormatError(f"{where(name, field_name)}section must be [offset, length, crc32]")
        off, length, crc = v
        expected = section_start(self.end, self.version, aligned)
        if off != expected:
            raise SwsFormatError(
                f"{where(name, field_name)}section offset {off} != expected {expected} "
                "(sections must be in order, aligned as SPEC.md says, without gaps or overlaps)"
            )
        if length < 0 or off + length > len(self.data):
            raise SwsFormatError(
                f"{where(name, field_name)}section [{off}, +{length}) runs past the end of the "
                f"data area ({len(self.data)} bytes): file truncated?"
            )
        if any(self.data[self.end : off]):
            raise SwsFormatError(f"{where(name, field_name)}padding before the section is not zero")
        if not 0 <= crc <= 0xFFFFFFFF:
            raise SwsFormatError(f"{where(name, field_name)}crc32 {crc} out of range")
        chunk = self.data[off : off + length]
        if self.verify and zlib.crc32(chunk) & 0xFFFFFFFF != crc:
            raise SwsChecksumError(f"{where(name, field_name)}CRC-32 mismatch: section corrupted")
        self.end = off + length
        return np.frombuffer(chunk, dtype=np.uint8)

    def finish(self) -> None:
        if len(self.data) != self.end:
            raise SwsFormatError(
                f"data area is {len(self.data)} bytes but sections end at {self.end}: trailing or missing bytes"
            )


def _stream(v: Any, name: str, fld: str, alphabet: int, count: int, layout: _Layout) -> Stream:
    c = _Check(v, name, fld)
    c.keys({"coder", "code", "bits", "section"})
    coder = c.str("coder", {CODER_HUFFMAN})
    raw = c.bytes("code")
    if len(raw) != (alphabet + 1) // 2:
        raise SwsFormatError(f"{where(name, fld)}code table of {len(raw)} bytes, alphabet of {alphabet} symbols needs {(alphabet + 1) // 2}")
    code = unpack_nibbles(raw, alphabet)
    if alphabet % 2 and raw[-1] & 0x0F:
        raise SwsFormatError(f"{where(name, fld)}padding nibble of the code table is not zero")
    max_bits = count * MAX_CODE_LENGTH
    bits = c.int("bits", 0, max_bits)
    used = code[code > 0]
    if count and used.size and bits < count * int(used.min()):
        raise SwsFormatError(f"{where(name, fld)}{bits} bits cannot hold {count} symbols")
    data = layout.take(c.m["section"], name, fld)
    if data.size != (bits + 7) // 8:
        raise SwsFormatError(f"{where(name, fld)}section of {data.size} bytes for {bits} bits")
    return Stream(code, bits, data, coder)


def parse(buf: Buffer, verify: bool = True) -> Container:
    """Validate and parse a whole file; sections are zero-copy views into ``buf``."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    prelude = read_prelude(mv)
    version = prelude.version
    header = decode_header(mv, prelude)
    data_start = prelude.data_start
    if len(mv) < data_start:
        raise SwsFormatError(f"file truncated before the data area at offset {data_start}")
    if any(mv[prelude.length + prelude.stored + 4 : data_start]):
        raise SwsFormatError("padding between header CRC and data area is not zero")
    top = _Check(header, None, "header")
    top.keys({"format", "version", "library", "architecture", "metadata", "tensors"})
    top.str("format", {"sws"})
    if top.int("version", 0, 65535) != version:
        raise SwsFormatError("header version differs from the prelude version")
    library = top.str("library")
    arch = header["architecture"]
    if arch is not None:
        a = _Check(arch, None, "architecture")
        a.keys({"name", "kwargs"})
        a.str("name")
        if not isinstance(arch["kwargs"], dict):
            raise SwsFormatError("architecture kwargs must be a map")
    meta = header["metadata"]
    if not isinstance(meta, dict) or any(not isinstance(v, str) for v in meta.values()):
        raise SwsFormatError("metadata must be a map of strings to strings")
    tensors_v = header["tensors"]
    if not isinstance(tensors_v, list):
        raise SwsFormatError("'tensors' must be a list")
    layout = _Layout(mv[data_start:], verify, version)
    tensors: list[Tensor] = []
    names: set[str] = set()
    for i, tv in enumerate(tensors_v):
        pre = _Check(tv, f"#{i}", "tensor")
        if "name" not in pre.m:
            raise SwsFormatError(f"tensor #{i}: missing 'name'")
        name = pre.str("name")
        if name in names:
            raise SwsFormatError(f"{where(name, 'name')}duplicate tensor name")
        names.add(name)
        c = _Check(tv, name, "tensor")
        if "kind" not in c.m:
            raise SwsFormatError(f"{where(name, 'kind')}missing")
        kind = c.str("kind", {"sws", "raw"})
        if kind == "raw":
            c.keys({"name", "kind", "dtype", "shape", "data"})
            dtype = c.str("dtype", RAW_DTYPES)
            shape = _shape(c.m["shape"], name)
            numel = int(np.prod(shape, dtype=object)) if shape else 1
            data = layout.take(c.m["data"], name, "data", aligned=True)
            if data.size != numel * RAW_DTYPES[dtype].itemsize:
                raise SwsFormatError(f"{where(name, 'data')}{data.size} bytes for {numel} {dtype} elements")
            tensors.append(RawTensor(name, dtype, shape, data))
            continue
        c.keys(
            {"name", "kind", "dtype", "shape", "index_bits", "codebook", "nonzeros", "entries",
             "row_bits", "row_counts", "gaps", "values"}
        )
        dtype = c.str("dtype", SWS_DTYPES)
        shape = _shape(c.m["shape"], name)
        rows, cols = matrix_shape(shape)
        numel = rows * cols
        index_bits = c.int("index_bits", 1, MAX_INDEX_BITS)
        cb_raw = c.bytes("codebook")
        itemsize = SWS_DTYPES[dtype].itemsize
        if len(cb_raw) % itemsize or len(cb_raw) // itemsize > MAX_CODEBOOK:
            raise SwsFormatError(f"{where(name, 'codebook')}{len(cb_raw)} bytes is not a list of at most {MAX_CODEBOOK} {dtype}")
        codebook = np.frombuffer(cb_raw, dtype=SWS_DTYPES[dtype])
        if np.any(codebook == 0):
            raise SwsFormatError(f"{where(name, 'codebook')}holds the zero pattern, which is implicit")
        if np.unique(codebook).size != codebook.size:
            raise SwsFormatError(f"{where(name, 'codebook')}holds duplicate values")
        if dtype != "bfloat16" and not np.all(np.isfinite(codebook.view(dtype))):
            raise SwsFormatError(f"{where(name, 'codebook')}holds a non-finite value")
        if dtype == "bfloat16" and np.any((codebook & 0x7F80) == 0x7F80):
            raise SwsFormatError(f"{where(name, 'codebook')}holds a non-finite value")
        nonzeros = c.int("nonzeros", 0, numel)
        maxgap = (1 << index_bits)
        # Every entry either is a non-zero or bridges maxgap zeros, so entries are bounded.
        max_entries = nonzeros + numel // maxgap + rows
        entries = c.int("entries", nonzeros, max_entries)
        if nonzeros and codebook.size == 0:
            raise SwsFormatError(f"{where(name, 'codebook')}is empty but the tensor has {nonzeros} non-zeros")
        row_bits = c.int("row_bits", 0, MAX_ROW_BITS)
        if entries and row_bits == 0:
            raise SwsFormatError(f"{where(name, 'row_bits')}is 0 but the tensor has {entries} entries")
        row_counts = layout.take(c.m["row_counts"], name, "row_counts")
        if row_counts.size != (rows * row_bits + 7) // 8:
            raise SwsFormatError(f"{where(name, 'row_counts')}{row_counts.size} bytes for {rows} counts of {row_bits} bits")
        gaps = _stream(c.m["gaps"], name, "gaps", 1 << index_bits, entries, layout)
        values = _stream(c.m["values"], name, "values", codebook.size + 1, entries, layout)
        tensors.append(
            SwsTensor(name, dtype, shape, index_bits, codebook, nonzeros, entries, row_bits, row_counts, gaps, values)
        )
    layout.finish()
    return Container(tensors, dict(meta), arch, library, version, raw_header=header, header_bytes=prelude.stored, header_size=prelude.size)
