"""Constants of the ``.sws`` format, versions 1 to 3 (see ``SPEC.md`` for the byte layout)."""

from __future__ import annotations

import numpy as np

MAGIC = b"\x89SWS\r\n\x1a\n"
FORMAT_VERSION = 3  # what the writer produces by default
VERSIONS = (1, 2, 3)  # what the reader reads
# Prelude length by version. v1: magic (8), version u16, reserved u16, header length u32.
# v2: magic (8), version u16, header coding u8, reserved u8, stored header length u32,
# decoded header length u32.
PRELUDE = {1: 16, 2: 20, 3: 20}  # v3: as v2, the header being the binary index
MAX_PRELUDE = 20
HEADER_MSGPACK = 0  # v2 header coding: the msgpack bytes as they are
HEADER_DEFLATE = 1  # v2 header coding: raw deflate (RFC 1951) of the msgpack bytes
ALIGN = 8
MAX_HEADER = 16 * 1024 * 1024
MAX_CODE_LENGTH = 15  # code lengths travel as 4-bit nibbles
MAX_INDEX_BITS = 12
MAX_ROW_BITS = 40
MAX_CODEBOOK = 255  # non-zero values per tensor, so a value symbol fits in one byte
MAX_NDIM = 16
MAX_NAME = 1024
# Header structure: a header is unpacked into Python objects, so their number is bounded
# before unpacking (a 16 MiB header of empty maps would otherwise take gigabytes).
MAX_TENSORS = 100_000
MAX_HEADER_DEPTH = 16  # nesting of maps and arrays; the schema needs 5 plus architecture kwargs
MAX_HEADER_CONTAINERS = 8 * MAX_TENSORS + 65_536  # a tensor entry holds at most 7 maps and arrays
# A deflated header may decode to at most this many times its stored size once it is over
# MAX_INFLATED_FREE decoded bytes (real headers deflate 2-4x; a bomb of empty maps ~1000x).
# Validating a header costs time per decoded byte, so this bounds that cost per file byte.
MAX_HEADER_RATIO = 8
# Decoded output may exceed the file by MAX_EXPANSION (or reach MIN_OUTPUT_LIMIT) unless the
# caller raises the limit: a tiny hostile file cannot make a reader allocate gigabytes.
MAX_EXPANSION = 4096
MIN_OUTPUT_LIMIT = 64 * 1024 * 1024
MAX_INFLATED_FREE = 1 << 20

CODER_HUFFMAN = "huffman"

# dtype name -> (numpy storage dtype, itemsize). bfloat16 has no numpy dtype: its bits travel as uint16.
RAW_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<f8"),
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"),
    "int64": np.dtype("<i8"),
    "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"),
    "int8": np.dtype("i1"),
    "uint8": np.dtype("u1"),
    "bool": np.dtype("?"),
}

# Floating dtypes a sws tensor may have, with the unsigned integer type of their bit patterns.
SWS_DTYPES: dict[str, np.dtype] = {
    "float64": np.dtype("<u8"),
    "float32": np.dtype("<u4"),
    "float16": np.dtype("<u2"),
    "bfloat16": np.dtype("<u2"),
}


def codebook_problem(codebook: np.ndarray, dtype: str) -> str | None:
    """What is wrong with a stored codebook of ``dtype`` bit patterns, or None: the zero
    pattern (implicit), a duplicate, or a value that is not finite."""
    if not codebook.size:
        return None
    if np.any(codebook == 0):
        return "holds the zero pattern, which is implicit"
    if np.unique(codebook).size != codebook.size:
        return "holds duplicate values"
    finite = (codebook & 0x7F80) != 0x7F80 if dtype == "bfloat16" else np.isfinite(codebook.view(dtype))
    if not np.all(finite):
        return "holds a non-finite value"
    return None


def align(n: int) -> int:
    """Round ``n`` up to the next multiple of :data:`ALIGN`."""
    return (n + ALIGN - 1) // ALIGN * ALIGN


def default_index_bits(ndim: int) -> int:
    """Deep Compression's widths: 5 bits for fully connected, 8 for conv (and 1-D) tensors."""
    return 5 if ndim == 2 else 8


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a tensor is coded in: ``(shape[0], prod(shape[1:]))``; 1-D is one row."""
    if len(shape) == 0:
        return 1, 1
    if len(shape) == 1:
        return 1, shape[0]
    rest = 1
    for s in shape[1:]:
        rest *= s
    return shape[0], rest


def pack_nibbles(lengths: np.ndarray) -> bytes:
    """Two code lengths (0..15) per byte, first in the high nibble; odd counts pad with 0."""
    a = np.asarray(lengths, dtype=np.uint8)
    if a.size % 2:
        a = np.append(a, np.uint8(0))
    return ((a[0::2] << 4) | a[1::2]).astype(np.uint8).tobytes()


def unpack_nibbles(raw: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles` for ``count`` lengths."""
    b = np.frombuffer(raw, dtype=np.uint8)
    out = np.empty(b.size * 2, dtype=np.uint8)
    out[0::2] = b >> 4
    out[1::2] = b & 0x0F
    return out[:count]
