"""Bytes <-> plain dataclasses for ``.sws`` files (numpy and msgpack only, no torch).

:func:`serialize` lays sections out canonically; :func:`parse` validates *everything*
(prelude, header schema and ranges, section layout, checksums, cross-field sizes)
before any payload is touched, so kernels only ever see consistent inputs.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack
import numpy as np

from . import format3 as f3
from . import kernels
from .errors import SwsChecksumError, SwsEncodeError, SwsFormatError, where
from .spec import (
    ALIGN,
    CODER_HUFFMAN,
    FORMAT_VERSION,
    HEADER_DEFLATE,
    HEADER_MSGPACK,
    MAGIC,
    MAX_CODE_LENGTH,
    MAX_CODEBOOK,
    MAX_HEADER,
    MAX_HEADER_CONTAINERS,
    MAX_HEADER_DEPTH,
    MAX_HEADER_RATIO,
    MAX_INDEX_BITS,
    MAX_INFLATED_FREE,
    MAX_NAME,
    MAX_NDIM,
    MAX_ROW_BITS,
    MAX_TENSORS,
    PRELUDE,
    RAW_DTYPES,
    SWS_DTYPES,
    VERSIONS,
    align,
    codebook_problem,
    matrix_shape,
    pack_nibbles,
    unpack_nibbles,
)

Buffer = bytes | bytearray | memoryview
INT64_MAX = (1 << 63) - 1
MAX_SPAN = 1 << 62  # product of a shape's sizes (0 counted as 1) times the item size: strides stay in int64


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
    coder: str = field(default="huffman", init=False)

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)


@dataclass
class ContextTensor:
    """A weight tensor coded by the context-modelled range coder of format 3 (SPEC.md 9)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    codebook: np.ndarray  # bit patterns (unsigned ints) of the non-zero values
    nonzeros: int
    data: np.ndarray  # uint8, the range coder's bytes
    counting: bool = True  # the counting estimator (kind 4) rather than two fixed rates (kind 2)
    kind: str = field(default="sws", init=False)
    coder: str = field(default="context", init=False)

    @property
    def matrix(self) -> tuple[int, int]:
        return matrix_shape(self.shape)


@dataclass
class AliasTensor:
    """A name for an earlier tensor of the same file (tied weights; format 3)."""

    name: str
    target: str
    kind: str = field(default="alias", init=False)


@dataclass
class RawTensor:
    """A tensor stored as its raw little-endian bytes (biases, buffers, kept layers)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: np.ndarray  # uint8
    kind: str = field(default="raw", init=False)


@dataclass
class SparseRawTensor:
    """A tensor stored as its non-zero elements' raw bytes, their positions context-coded
    (format 3, kind 5): biases of pruned units, pruned layers that are not quantized."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nonzeros: int
    positions: np.ndarray  # uint8, the range coder's bytes
    values: np.ndarray  # uint8, nonzeros * itemsize little-endian bytes in row-major order
    kind: str = field(default="raw", init=False)
    coder: str = field(default="sparse", init=False)


Tensor = SwsTensor | ContextTensor | RawTensor | SparseRawTensor | AliasTensor


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
    index_bytes: list[int] = field(default_factory=list, repr=False, compare=False)  # version 3, per tensor


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
    elif version in (2, 3):
        if coding not in (None, HEADER_MSGPACK, HEADER_DEFLATE):
            raise ValueError(f"unknown header coding {coding}")
        stored = header
        if coding != HEADER_MSGPACK:
            packed = _deflate(header)
            # Readers refuse a header that inflates too far (a bomb looks like that), so such
            # a header is stored plain.
            expands = len(header) > max(MAX_INFLATED_FREE, MAX_HEADER_RATIO * len(packed))
            if coding == HEADER_DEFLATE and expands:
                raise SwsFormatError(f"a deflated header of {len(packed)} bytes would expand {len(header)} bytes")
            if coding == HEADER_DEFLATE or (len(packed) < len(header) and not expands):
                stored = packed
        coding = HEADER_DEFLATE if stored is not header else HEADER_MSGPACK
        head = MAGIC + struct.pack("<HBBII", version, coding, 0, len(stored), len(header)) + stored
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


def codebook_key(t: SwsTensor | ContextTensor) -> tuple[str, bytes]:
    """Identity of a codebook in format 3: the first tensor with it stores it, later ones refer to it."""
    return t.dtype, t.codebook.astype(SWS_DTYPES[t.dtype]).tobytes()


def _serialize3(c: Container, check: bool = True) -> bytes:
    """Version 3: binary index, per-tensor CRCs, shared codebooks, aliases (SPEC.md 8).
    ``check=False`` writes what it is given unchecked (the fuzz campaign's hostile files)."""
    end = 0
    payload: list[tuple[int, np.ndarray]] = []
    records: list[bytes] = []
    position = {t.name: i for i, t in enumerate(c.tensors)}
    codebooks: dict[tuple[str, bytes], int] = {}
    previous = b""

    def place(arrays: list[np.ndarray], aligned: bool) -> int:
        nonlocal end
        crc = 0
        for k, arr in enumerate(arrays):
            arr = np.ascontiguousarray(arr, dtype=np.uint8)
            here = section_start(end, 3, aligned and k == 0)
            payload.append((here, arr))
            end = here + arr.size
            crc = zlib.crc32(arr, crc)
        return crc & 0xFFFFFFFF

    for i, t in enumerate(c.tensors):
        name = t.name.encode("utf-8")
        if isinstance(t, AliasTensor):
            target = position.get(t.target)
            if check and (target is None or target >= i or isinstance(c.tensors[target], AliasTensor)):
                raise SwsEncodeError(f"{where(t.name)}an alias must name an earlier tensor that is not an alias")
            target = i + 1 if target is None else target
            fields = f3.varint(target)
            kind = f3.KIND_ALIAS
        elif isinstance(t, RawTensor):
            kind = f3.KIND_RAW
            fields = f3.shape_fields(t.dtype, t.shape) + struct.pack("<I", place([t.data], True))
        elif isinstance(t, SparseRawTensor):
            kind = f3.KIND_SPARSE_RAW
            fields = (f3.shape_fields(t.dtype, t.shape) + f3.varint(int(t.nonzeros)) + f3.varint(int(t.positions.size))
                      + struct.pack("<I", place([t.positions, t.values], False)))
        else:
            key = codebook_key(t)
            fields = f3.shape_fields(t.dtype, t.shape) + f3.codebook_fields(t.codebook, t.dtype, codebooks.get(key))
            codebooks.setdefault(key, i)
            fields += f3.varint(int(t.nonzeros))
            if isinstance(t, ContextTensor):
                kind = f3.KIND_COUNTING if t.counting else f3.KIND_CONTEXT
                fields += f3.varint(int(t.data.size)) + struct.pack("<I", place([t.data], False))
            else:
                kind = f3.KIND_HUFFMAN
                fields += f3.huffman_fields(t.index_bits, t.entries, t.row_bits, t.gaps.code_lengths, t.gaps.bits,
                                            t.values.code_lengths, t.values.bits)
                fields += struct.pack("<I", place([t.row_counts, t.gaps.data, t.values.data], False))
        records.append(f3.tensor_record(name, previous, kind, fields))
        previous = name
    try:
        index = f3.pack_index(c.library, c.architecture, dict(c.metadata), records)
        if len(index) > MAX_HEADER:
            raise SwsFormatError(f"index of {len(index)} bytes exceeds the {MAX_HEADER}-byte limit")
        head = pack_head(index, 3)
        # The reader's own checks, so that a file is never written that readers refuse.
        if check:
            check_header(index, Prelude(3, HEADER_MSGPACK, len(index), len(index)))
    except SwsFormatError as exc:
        raise SwsEncodeError(f"the file would not be readable: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack cannot pack the architecture
        raise SwsEncodeError(f"the header cannot be written: {type(exc).__name__}: {exc}") from None
    return _assemble(head, payload, end)


def _assemble(head: bytes, payload: list[tuple[int, np.ndarray]], end: int) -> bytes:
    """The file: ``head`` (prelude, header, CRC, padding), then each section at its offset."""
    out = bytearray(len(head) + end)
    out[: len(head)] = head
    for off, arr in payload:
        out[len(head) + off : len(head) + off + arr.size] = arr.tobytes()
    return bytes(out)


def serialize(c: Container) -> bytes:
    """The canonical byte form of ``c`` (deterministic for a given zlib: same container,
    same bytes; the decoded header and the data area are the same with any zlib)."""
    if c.version == 3:
        return _serialize3(c)
    if any(isinstance(t, AliasTensor | ContextTensor | SparseRawTensor) for t in c.tensors):
        raise SwsEncodeError(f"format version {c.version} has no aliases, context-coded or sparse raw tensors "
                             "(version 3 has)")
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
    header_map = {
        "format": "sws",
        "version": c.version,
        "library": c.library,
        "architecture": c.architecture,
        "metadata": dict(c.metadata),
        "tensors": entries,
    }
    try:
        header = msgpack.packb(header_map, use_bin_type=True)
        # The reader's own checks, so that a file is never written that readers refuse.
        if len(header) > MAX_HEADER:
            raise SwsFormatError(f"header of {len(header)} bytes exceeds the {MAX_HEADER}-byte limit")
        check_header(unpack_header(header), Prelude(c.version, HEADER_MSGPACK, len(header), len(header)))
        head = pack_head(header, c.version)
    except SwsFormatError as exc:
        raise SwsEncodeError(f"the file would not be readable: {exc}") from None
    except (TypeError, ValueError, OverflowError) as exc:  # msgpack cannot pack a value
        raise SwsEncodeError(f"the header cannot be written: {type(exc).__name__}: {exc}") from None
    return _assemble(head, payload, end)


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
    if len(buf) < 8 or bytes(buf[:8]) != MAGIC:
        raise SwsFormatError("not a .sws file: bad magic bytes at offset 0")
    if len(buf) < PRELUDE[1]:
        raise SwsFormatError(f"file of {len(buf)} bytes is shorter than the {PRELUDE[1]}-byte prelude")
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
    if coding == HEADER_DEFLATE and size > max(MAX_INFLATED_FREE, MAX_HEADER_RATIO * stored):
        raise SwsFormatError(
            f"deflated header of {stored} bytes declares {size} decoded bytes, more than "
            f"{MAX_HEADER_RATIO} times its size (limit for headers over {MAX_INFLATED_FREE} bytes)"
        )
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


def unpack_header(raw: bytes) -> Any:
    """msgpack bytes -> Python objects, after a pass that bounds nesting and container count."""
    status, _, _ = kernels.msgpack_shape(
        np.frombuffer(raw, dtype=np.uint8), MAX_HEADER_DEPTH, MAX_HEADER_CONTAINERS, MAX_TENSORS
    )
    if status != kernels.MSGPACK_OK:
        limits = (f" (limits: {MAX_HEADER_DEPTH} levels, {MAX_HEADER_CONTAINERS} maps and arrays, "
                  f"{MAX_TENSORS} items in one)")
        raise SwsFormatError(f"header msgpack {kernels.MSGPACK_STATUS[status]}{limits if status in (-4, -5, -7) else ''}")
    try:
        return msgpack.unpackb(
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


def decode_header(buf: Buffer, prelude: Prelude) -> dict | bytes:
    """Check the header CRC, inflate it if deflated and unpack its msgpack map with
    hostile-input limits (version 3: the index bytes, parsed by :func:`check_header`)."""
    start = prelude.length
    need = start + prelude.stored + 4
    if len(buf) < need:
        raise SwsFormatError(f"file truncated inside the header: {len(buf)} bytes, header needs {need}")
    stored = struct.unpack("<I", bytes(buf[need - 4 : need]))[0]
    if zlib.crc32(buf[: need - 4]) & 0xFFFFFFFF != stored:
        raise SwsChecksumError("header CRC-32 mismatch: the header is corrupted")
    raw = bytes(buf[start : need - 4])
    if prelude.coding == HEADER_DEFLATE:
        raw = _inflate(raw, prelude.size)
    if prelude.version == 3:
        return raw
    header = unpack_header(raw)
    if not isinstance(header, dict):
        raise SwsFormatError("header is not a msgpack map")
    return header


class Section(NamedTuple):
    """A section reference: bytes ``[offset, offset + length)`` of the data area and their CRC-32."""

    offset: int
    length: int
    crc: int

    @property
    def end(self) -> int:
        return self.offset + self.length


def output_bytes(kind: str, dtype: str, shape: tuple[int, ...], nonzeros: int, coder: str = "huffman") -> int:
    """The most a decoder allocates for a tensor: its dense bytes and, for a coded tensor, a
    count per row and a column index per non-zero (its sparse CSR form); the context coder
    also keeps a symbol per non-zero, a mask byte per row and 10 bytes per column."""
    dense = math.prod(shape) * (SWS_DTYPES if kind == "sws" else RAW_DTYPES)[dtype].itemsize
    if kind == "raw" and coder != "sparse":
        return dense
    rows, cols = matrix_shape(shape)
    if kind == "raw":  # positions decoded as for the context coder, then the values scattered
        return dense + 8 * (rows + 1) + 16 * nonzeros + rows + (10 * cols if rows * cols else 0)
    # (column state exists only once a row is live, i.e. when the tensor has elements)
    extra = 8 * nonzeros + rows + (10 * cols if rows * cols else 0) if coder == "context" else 0
    return dense + 8 * (rows + 1) + 8 * nonzeros + extra


@dataclass
class Entry:
    """One tensor's header facts, validated, without its payload (what a lazy reader indexes).

    ``start`` is where the previous tensor's sections end (the padding before this tensor's
    first section begins there) and ``end`` where its own last section ends.
    """

    name: str
    kind: str
    dtype: str
    shape: tuple[int, ...]
    sections: tuple[Section, ...]  # raw: (data,); coded: (row_counts, gaps, values)
    start: int
    end: int
    index_bits: int = 0
    codebook: np.ndarray | None = None
    nonzeros: int = 0
    entries: int = 0
    row_bits: int = 0
    gap_lengths: np.ndarray | None = None
    gap_bits: int = 0
    value_lengths: np.ndarray | None = None
    value_bits: int = 0
    coder: str = "huffman"  # of a coded tensor: "huffman" or (version 3) "context"; of a raw one (kind 5) "sparse"
    counting: bool = False  # a context-coded tensor's estimator: counting (kind 4) or two fixed rates (kind 2)
    alias_of: str | None = None  # version 3: the earlier tensor this name stands for
    crc: int | None = None  # version 3: CRC-32 of all its sections' bytes (None: one per section)
    index_bytes: int = 0  # version 3: bytes of its index record

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return (SWS_DTYPES if self.kind == "sws" else RAW_DTYPES)[self.dtype].itemsize

    @property
    def output_bytes(self) -> int:
        if self.kind == "alias":
            return 0
        return output_bytes(self.kind, self.dtype, self.shape, self.nonzeros, self.coder)

    @property
    def stored_bytes(self) -> int:
        return sum(s.length for s in self.sections)


@dataclass
class Header:
    """A validated header: file facts and the index of tensors, no payload."""

    version: int
    library: str
    architecture: dict[str, Any] | None
    metadata: dict[str, str]
    entries: list[Entry]
    data_start: int
    data_length: int
    stored: int  # header bytes in the file
    size: int  # decoded msgpack bytes
    raw: dict[str, Any] | None = field(repr=False)  # versions 1-2: the header map (3: see header_map)

    def header_map(self) -> dict[str, Any]:
        """The header as a map: version 1-2's own; version 3's index in the same shape, built
        on request (a small index can describe many tensors)."""
        if self.raw is not None:
            return self.raw
        return {
            "format": "sws", "version": self.version, "library": self.library, "architecture": self.architecture,
            "metadata": self.metadata, "tensors": [_entry_view(e) for e in self.entries],
        }

    @property
    def file_size(self) -> int:
        return self.data_start + self.data_length

    def container(self, tensors: list[Tensor]) -> Container:
        """The whole file, given its materialized tensors."""
        return Container(tensors, self.metadata, self.architecture, self.library, self.version,
                         raw_header=self.raw, header_bytes=self.stored, header_size=self.size,
                         index_bytes=[e.index_bytes for e in self.entries])


class _Check:
    """Typed access to a header map, raising SwsFormatError that names tensor and field."""

    def __init__(self, m: Any, tensor: str | None, ctx: str) -> None:
        if not isinstance(m, dict):
            raise SwsFormatError(f"{where(tensor, ctx)}expected a map, got {type(m).__name__}")
        self.m, self.tensor, self.ctx = m, tensor, ctx

    def keys(self, required: frozenset[str]) -> None:
        if self.m.keys() != required:
            got = set(self.m)
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
            shown = repr(v) if not isinstance(v, str) or len(v) <= 80 else f"a string of {len(v)} characters"
            raise SwsFormatError(f"{where(self.tensor, key)}{shown} is not a valid string{allowed}")
        return v

    def bytes(self, key: str) -> bytes:
        v = self.m[key]
        if not isinstance(v, bytes):
            raise SwsFormatError(f"{where(self.tensor, key)}expected bytes, got {type(v).__name__}")
        return v


def _shape(v: Any, name: str, itemsize: int) -> tuple[int, ...]:
    if not isinstance(v, list) or len(v) > MAX_NDIM:
        raise SwsFormatError(f"{where(name, 'shape')}expected a list of at most {MAX_NDIM} sizes")
    # The element count with empty dimensions counted as 1, in bytes: byte strides (numpy's)
    # must fit in int64 even for a tensor with no elements.
    span = itemsize
    for s in v:
        if type(s) is not int or s < 0 or s > INT64_MAX:
            raise SwsFormatError(f"{where(name, 'shape')}size {s!r} is not a non-negative integer")
        span *= max(s, 1)
        if span > MAX_SPAN:
            raise SwsFormatError(f"{where(name, 'shape')}sizes {v} overflow int64 byte strides "
                                 "(product times the item size over 2**62)")
    return tuple(v)


class _Layout:
    """Checks that section references follow each other canonically (header only)."""

    def __init__(self, version: int) -> None:
        self.version, self.end = version, 0

    def take(self, v: Any, name: str, field_name: str, aligned: bool = False) -> Section:
        if type(v) is not list or len(v) != 3:
            raise SwsFormatError(f"{where(name, field_name)}section must be [offset, length, crc32]")
        off, length, crc = v
        if type(off) is not int or type(length) is not int or type(crc) is not int:
            raise SwsFormatError(f"{where(name, field_name)}section must be [offset, length, crc32]")
        expected = section_start(self.end, self.version, aligned)
        if off != expected:
            raise SwsFormatError(
                f"{where(name, field_name)}section offset {off} != expected {expected} "
                "(sections must be in order, aligned as SPEC.md says, without gaps or overlaps)"
            )
        if not 0 <= length <= INT64_MAX - off:
            raise SwsFormatError(f"{where(name, field_name)}section length {length} out of range")
        if not 0 <= crc <= 0xFFFFFFFF:
            raise SwsFormatError(f"{where(name, field_name)}crc32 {crc} out of range")
        self.end = off + length
        return Section(off, length, crc)


_STREAM_KEYS = frozenset({"coder", "code", "bits", "section"})
_TOP_KEYS = frozenset({"format", "version", "library", "architecture", "metadata", "tensors"})
_RAW_KEYS = frozenset({"name", "kind", "dtype", "shape", "data"})
_SWS_KEYS = frozenset(
    {"name", "kind", "dtype", "shape", "index_bits", "codebook", "nonzeros", "entries",
     "row_bits", "row_counts", "gaps", "values"}
)


def check_code_lengths(lengths: np.ndarray, count: int, tensor: str | None, fld: str | None) -> None:
    """A usable canonical prefix code whatever the stream's symbol count: lengths of at most
    15 bits that satisfy Kraft's inequality, and at least one code when there are symbols.
    (Decode tables are built from every table, so an empty stream's table is checked too.)"""
    loc = where(tensor, fld)
    if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
        raise SwsFormatError(f"{loc}code length {int(lengths.max())} exceeds {MAX_CODE_LENGTH}")
    used = lengths[lengths > 0].astype(np.int64)
    if int((np.int64(1) << (MAX_CODE_LENGTH - used)).sum()) > 1 << MAX_CODE_LENGTH:
        raise SwsFormatError(f"{loc}code lengths are over-subscribed (Kraft sum > 1)")
    if count and used.size == 0:
        raise SwsFormatError(f"{loc}no symbol has a code but the stream holds {count} symbols")


@functools.lru_cache(maxsize=4096)
def _code_table(raw: bytes, alphabet: int, has_symbols: bool) -> tuple[np.ndarray, int, str | None]:
    """(lengths, shortest code length, what is wrong or None) of a stored code table; cached,
    since the tensors of one file often share tables and a hostile header may repeat one."""
    if len(raw) != (alphabet + 1) // 2:
        return np.zeros(0, np.uint8), 0, f"code table of {len(raw)} bytes, alphabet of {alphabet} symbols needs {(alphabet + 1) // 2}"
    code = unpack_nibbles(raw, alphabet)
    code.setflags(write=False)
    if alphabet % 2 and raw[-1] & 0x0F:
        return code, 0, "padding nibble of the code table is not zero"
    try:
        check_code_lengths(code, int(has_symbols), None, None)
    except SwsFormatError as exc:
        return code, 0, str(exc)
    used = code[code > 0]
    return code, int(used.min()) if used.size else 0, None


def _stream_code(name: str, fld: str, raw: bytes, alphabet: int, count: int, bits: int) -> np.ndarray:
    """The code lengths of a Huffman stream of ``count`` symbols in ``bits`` bits, checked."""
    code, shortest, wrong = _code_table(raw, alphabet, count > 0)
    if wrong is not None:
        raise SwsFormatError(f"{where(name, fld)}{wrong}")
    if bits > count * MAX_CODE_LENGTH or (count and bits < count * shortest):
        raise SwsFormatError(f"{where(name, fld)}{bits} bits cannot hold {count} symbols")
    return code


def _stream(v: Any, name: str, fld: str, alphabet: int, count: int, layout: _Layout) -> tuple[np.ndarray, int, Section]:
    c = _Check(v, name, fld)
    c.keys(_STREAM_KEYS)
    c.str("coder", {CODER_HUFFMAN})
    bits = c.int("bits", 0, INT64_MAX)
    code = _stream_code(name, fld, c.bytes("code"), alphabet, count, bits)
    section = layout.take(c.m["section"], name, fld)
    if section.length != (bits + 7) // 8:
        raise SwsFormatError(f"{where(name, fld)}section of {section.length} bytes for {bits} bits")
    return code, bits, section


def _entry(i: int, tv: Any, layout: _Layout, names: set[str]) -> Entry:
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
    start = layout.end
    if kind == "raw":
        c.keys(_RAW_KEYS)
        dtype = c.str("dtype", RAW_DTYPES)
        shape = _shape(c.m["shape"], name, RAW_DTYPES[dtype].itemsize)
        data = layout.take(c.m["data"], name, "data", aligned=True)
        numel = math.prod(shape)
        if data.length != numel * RAW_DTYPES[dtype].itemsize:
            raise SwsFormatError(f"{where(name, 'data')}{data.length} bytes for {numel} {dtype} elements")
        return Entry(name, kind, dtype, shape, (data,), start, layout.end)
    c.keys(_SWS_KEYS)
    dtype = c.str("dtype", SWS_DTYPES)
    shape = _shape(c.m["shape"], name, SWS_DTYPES[dtype].itemsize)
    rows, cols = matrix_shape(shape)
    numel = rows * cols
    index_bits = c.int("index_bits", 1, MAX_INDEX_BITS)
    cb_raw = c.bytes("codebook")
    itemsize = SWS_DTYPES[dtype].itemsize
    if len(cb_raw) % itemsize or len(cb_raw) // itemsize > MAX_CODEBOOK:
        raise SwsFormatError(f"{where(name, 'codebook')}{len(cb_raw)} bytes is not a list of at most {MAX_CODEBOOK} {dtype}")
    codebook = np.frombuffer(cb_raw, dtype=SWS_DTYPES[dtype])
    wrong = codebook_problem(codebook, dtype)
    if wrong is not None:
        raise SwsFormatError(f"{where(name, 'codebook')}{wrong}")
    nonzeros = c.int("nonzeros", 0, numel)
    # Every entry either is a non-zero or bridges 2**index_bits zeros, so entries are bounded.
    entries = c.int("entries", nonzeros, nonzeros + numel // (1 << index_bits) + rows)
    if nonzeros and codebook.size == 0:
        raise SwsFormatError(f"{where(name, 'codebook')}is empty but the tensor has {nonzeros} non-zeros")
    row_bits = c.int("row_bits", 0, MAX_ROW_BITS)
    if entries and row_bits == 0:
        raise SwsFormatError(f"{where(name, 'row_bits')}is 0 but the tensor has {entries} entries")
    row_counts = layout.take(c.m["row_counts"], name, "row_counts")
    if row_counts.length != (rows * row_bits + 7) // 8:
        raise SwsFormatError(f"{where(name, 'row_counts')}{row_counts.length} bytes for {rows} counts of {row_bits} bits")
    glen, gbits, gsec = _stream(c.m["gaps"], name, "gaps", 1 << index_bits, entries, layout)
    vlen, vbits, vsec = _stream(c.m["values"], name, "values", codebook.size + 1, entries, layout)
    return Entry(
        name, kind, dtype, shape, (row_counts, gsec, vsec), start, layout.end,
        index_bits, codebook, nonzeros, entries, row_bits, glen, gbits, vlen, vbits,
    )


def _check_index3(index: bytes, prelude: Prelude) -> Header:
    library, arch, meta, records, cur = f3.read_index_records(index)
    layout = _Layout(3)
    entries: list[Entry] = []
    names: set[str] = set()
    for i, rec in enumerate(records):
        name = rec["name"]
        cur.tensor = name
        if name in names:
            raise SwsFormatError(f"{where(name, 'name')}duplicate tensor name")
        names.add(name)
        start = layout.end
        kind = rec["kind"]
        if kind == f3.KIND_ALIAS:
            t = rec["target"]
            if t >= i or entries[t].kind == "alias":
                raise SwsFormatError(f"{where(name, 'alias')}target #{t} is not an earlier tensor that is not an alias")
            e = entries[t]
            entries.append(Entry(name, "alias", e.dtype, e.shape, (), start, start, alias_of=e.name,
                                 index_bytes=rec["index_bytes"]))
            continue
        dtype, shape = rec["dtype"], rec["shape"]
        numel = math.prod(shape)
        if kind == f3.KIND_RAW:
            data = layout.take([section_start(layout.end, 3, True), numel * RAW_DTYPES[dtype].itemsize, 0], name, "data", True)
            entries.append(Entry(name, "raw", dtype, shape, (data,), start, layout.end, crc=rec["crc"],
                                 index_bytes=rec["index_bytes"]))
            continue
        if kind == f3.KIND_SPARSE_RAW:
            if rec["length"] < 4:
                raise SwsFormatError(f"{where(name, 'positions')}{rec['length']} bytes; a context-coded stream has at least 4")
            pos = layout.take([layout.end, rec["length"], 0], name, "positions")
            vals = layout.take([layout.end, rec["nonzeros"] * RAW_DTYPES[dtype].itemsize, 0], name, "values")
            entries.append(Entry(name, "raw", dtype, shape, (pos, vals), start, layout.end, nonzeros=rec["nonzeros"],
                                 coder="sparse", counting=True, crc=rec["crc"], index_bytes=rec["index_bytes"]))
            continue
        rows, _ = matrix_shape(shape)
        cb, nz = rec["codebook"], rec["nonzeros"]
        if kind in (f3.KIND_CONTEXT, f3.KIND_COUNTING):
            if rec["length"] < 4:
                raise SwsFormatError(f"{where(name, 'payload')}{rec['length']} bytes; a context-coded stream has at least 4")
            sec = layout.take([layout.end, rec["length"], 0], name, "payload")
            entries.append(Entry(name, "sws", dtype, shape, (sec,), start, layout.end, codebook=cb, nonzeros=nz,
                                 entries=nz, coder="context", counting=kind == f3.KIND_COUNTING, crc=rec["crc"],
                                 index_bytes=rec["index_bytes"]))
            continue
        sections = [layout.take([layout.end, (rows * rec["row_bits"] + 7) // 8, 0], name, "row_counts")]
        tables = []
        for fld, raw, bits, alphabet in (("gaps", rec["gap_code"], rec["gap_bits"], 1 << rec["index_bits"]),
                                         ("values", rec["value_code"], rec["value_bits"], cb.size + 1)):
            tables.append(_stream_code(name, fld, raw, alphabet, rec["entries"], bits))
            sections.append(layout.take([layout.end, (bits + 7) // 8, 0], name, fld))
        entries.append(Entry(
            name, "sws", dtype, shape, tuple(sections), start, layout.end, rec["index_bits"], cb, nz,
            rec["entries"], rec["row_bits"], tables[0], rec["gap_bits"], tables[1], rec["value_bits"],
            crc=rec["crc"], index_bytes=rec["index_bytes"],
        ))
    return Header(3, library, arch, meta, entries, prelude.data_start, layout.end, prelude.stored, prelude.size, None)


def _entry_view(e: Entry) -> dict[str, Any]:
    """A version 3 index record as a map like a version 2 header entry (for read_header)."""
    v: dict[str, Any] = {"name": e.name, "kind": e.kind, "dtype": e.dtype, "shape": list(e.shape)}
    if e.kind == "alias":
        v["alias_of"] = e.alias_of
    elif e.kind == "sws":
        v.update(coder=e.coder, nonzeros=e.nonzeros, codebook=e.codebook.tobytes())
        if e.coder == "huffman":
            v.update(index_bits=e.index_bits, entries=e.entries, row_bits=e.row_bits)
    if e.crc is not None:
        v["crc"] = e.crc
    return v


def check_header(header: dict | bytes, prelude: Prelude) -> Header:
    """Validate a decoded header map against the schema, the limits and the canonical layout
    (version 3: parse and validate the binary index).

    Needs no payload: the result says how long the data area must be and where every
    section lies, so a reader can check the file size before reading further.
    """
    if prelude.version == 3:
        if not isinstance(header, bytes):
            raise SwsFormatError("a version 3 index must be bytes")
        return _check_index3(header, prelude)
    top = _Check(header, None, "header")
    top.keys(_TOP_KEYS)
    top.str("format", {"sws"})
    if top.int("version", 0, 65535) != prelude.version:
        raise SwsFormatError("header version differs from the prelude version")
    library = top.str("library")
    arch = header["architecture"]
    if arch is not None:
        a = _Check(arch, None, "architecture")
        a.keys(frozenset({"name", "kwargs"}))
        a.str("name")
        if not isinstance(arch["kwargs"], dict):
            raise SwsFormatError("architecture kwargs must be a map")
    meta = header["metadata"]
    if not isinstance(meta, dict) or any(not isinstance(v, str) for v in meta.values()):
        raise SwsFormatError("metadata must be a map of strings to strings")
    tensors_v = header["tensors"]
    if not isinstance(tensors_v, list):
        raise SwsFormatError("'tensors' must be a list")
    if len(tensors_v) > MAX_TENSORS:
        raise SwsFormatError(f"header lists {len(tensors_v)} tensors, more than the limit of {MAX_TENSORS}")
    layout = _Layout(prelude.version)
    names: set[str] = set()
    entries = [_entry(i, tv, layout, names) for i, tv in enumerate(tensors_v)]
    return Header(
        prelude.version, library, arch, dict(meta), entries, prelude.data_start, layout.end,
        prelude.stored, prelude.size, header,
    )


def read_index(buf: Buffer) -> Header:
    """Prelude and header of ``buf`` (which may stop after the header), fully validated."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    prelude = read_prelude(mv)
    return check_header(decode_header(mv, prelude), prelude)


def materialize(e: Entry, chunk: Buffer, verify: bool = True) -> Tensor:
    """The tensor ``e`` from ``chunk``, the data area bytes ``[e.start, e.end)``: checks the
    zero padding and (with ``verify``) every section's CRC-32; arrays are views of ``chunk``."""
    if e.kind == "alias":
        return AliasTensor(e.name, e.alias_of or "")
    mv = memoryview(chunk).cast("B") if not isinstance(chunk, bytes) else memoryview(chunk)
    if len(mv) != e.end - e.start:
        raise SwsFormatError(f"{where(e.name)}file truncated: {len(mv)} of {e.end - e.start} bytes of its sections")
    if e.kind == "raw":
        names: tuple[str, ...] = ("positions", "values") if e.coder == "sparse" else ("data",)
    else:
        names = ("payload",) if e.coder == "context" else ("row_counts", "gaps", "values")
    arrays = []
    pos = 0
    crc = 0
    for fld, s in zip(names, e.sections):
        off = s.offset - e.start
        if any(mv[pos:off]):
            raise SwsFormatError(f"{where(e.name, fld)}padding before the section is not zero")
        part = mv[off : off + s.length]
        if verify and e.crc is not None:
            crc = zlib.crc32(part, crc)
        elif verify and zlib.crc32(part) & 0xFFFFFFFF != s.crc:
            raise SwsChecksumError(f"{where(e.name, fld)}CRC-32 mismatch: section corrupted")
        arrays.append(np.frombuffer(part, dtype=np.uint8))
        pos = off + s.length
    if verify and e.crc is not None and crc & 0xFFFFFFFF != e.crc:
        raise SwsChecksumError(f"{where(e.name)}CRC-32 mismatch: the tensor's bytes are corrupted")
    if e.kind == "raw":
        values = arrays[-1]
        if e.dtype == "bool" and values.size and int(values.max()) > 1:
            raise SwsFormatError(f"{where(e.name, 'values' if e.coder == 'sparse' else 'data')}a bool byte is not 0 or 1")
        if e.coder == "sparse":
            item = RAW_DTYPES[e.dtype].itemsize
            if values.size and not np.all(values.view(f"<u{item}" if item > 1 else np.uint8)):
                raise SwsFormatError(f"{where(e.name, 'values')}a stored element is zero (kind 5 stores non-zeros only)")
            return SparseRawTensor(e.name, e.dtype, e.shape, e.nonzeros, arrays[0], values)
        return RawTensor(e.name, e.dtype, e.shape, values)
    if e.coder == "context":
        return ContextTensor(e.name, e.dtype, e.shape, e.codebook, e.nonzeros, arrays[0], e.counting)
    rows, _ = matrix_shape(e.shape)
    for fld, arr, bits in (("row_counts", arrays[0], rows * e.row_bits), ("gaps", arrays[1], e.gap_bits),
                           ("values", arrays[2], e.value_bits)):
        if bits % 8 and int(arr[-1]) & ((1 << (8 - bits % 8)) - 1):
            raise SwsFormatError(f"{where(e.name, fld)}padding bits after the last code are not zero")
    return SwsTensor(
        e.name, e.dtype, e.shape, e.index_bits, e.codebook, e.nonzeros, e.entries, e.row_bits, arrays[0],
        Stream(e.gap_lengths, e.gap_bits, arrays[1]), Stream(e.value_lengths, e.value_bits, arrays[2]),
    )


def check_padding(buf: Buffer, h: Header) -> None:
    """The zero bytes between the header CRC and the data area."""
    if any(buf[h.data_start - (-(PRELUDE[h.version] + h.stored + 4) % ALIGN) : h.data_start]):
        raise SwsFormatError("padding between header CRC and data area is not zero")


def parse(buf: Buffer, verify: bool = True) -> Container:
    """Validate and parse a whole file; sections are zero-copy views into ``buf``."""
    mv = memoryview(buf).cast("B") if not isinstance(buf, bytes) else memoryview(buf)
    h = read_index(mv)
    if len(mv) < h.data_start:
        raise SwsFormatError(f"file truncated before the data area at offset {h.data_start}")
    check_padding(mv, h)
    data = mv[h.data_start :]
    if len(data) != h.data_length:
        raise SwsFormatError(
            f"data area is {len(data)} bytes but sections end at {h.data_length}: "
            f"{'file truncated' if len(data) < h.data_length else 'trailing bytes'}"
        )
    return h.container([materialize(e, data[e.start : e.end], verify) for e in h.entries])
