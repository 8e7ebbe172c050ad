"""Canonical Huffman codes: lengths from dahuffman, codes and decode tables rebuilt from lengths.

Only code *lengths* are stored in a file (one byte per symbol, as deflate does); both sides
derive the same canonical codes from them. dahuffman's own tables are not canonical and its
``save``/``load`` use pickle, so they never touch a file.
"""

from __future__ import annotations

import numpy as np
from dahuffman import HuffmanCodec

from .errors import SwsDecodeError, where
from .spec import MAX_CODE_LENGTH


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (uint8, 0 for unused symbols) for symbol ``counts``.

    A single used symbol gets length 1 (a real code costs at least a bit per symbol).
    Lengths beyond ``max_length`` are avoided by flattening the counts and rebuilding,
    which costs a negligible fraction of a bit on real data.
    """
    counts = np.asarray(counts, dtype=np.int64)
    lengths = np.zeros(counts.shape[0], dtype=np.uint8)
    used = np.flatnonzero(counts)
    if used.size == 0:
        return lengths
    if used.size == 1:
        lengths[used[0]] = 1
        return lengths
    if used.size > (1 << max_length):
        raise ValueError(f"{used.size} symbols cannot have codes of at most {max_length} bits")
    freq = counts[used].copy()
    while True:
        # eof=first symbol stops dahuffman from adding its own end-of-file symbol.
        table = HuffmanCodec.from_frequencies(
            {int(s): int(f) for s, f in zip(used, freq)}, eof=int(used[0])
        ).get_code_table()
        got = np.array([table[int(s)][0] for s in used], dtype=np.int64)
        if got.max() <= max_length:
            lengths[used] = got
            return lengths
        freq = np.maximum(freq >> 1, 1)


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical codes (uint32) for ``lengths``: by increasing length, then symbol index."""
    lengths = np.asarray(lengths, dtype=np.int64)
    codes = np.zeros(lengths.shape[0], dtype=np.uint32)
    code = 0
    prev = 0
    for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev
        prev = int(lengths[sym])
        codes[sym] = code
        code += 1
    return codes


def validate_lengths(lengths: np.ndarray, count: int, tensor: str, field: str) -> None:
    """Reject code-length tables that are not a usable prefix code for ``count`` symbols."""
    loc = where(tensor, field)
    if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
        raise SwsDecodeError(f"{loc}code length {int(lengths.max())} exceeds {MAX_CODE_LENGTH}")
    used = int(np.count_nonzero(lengths))
    if count == 0:
        return
    if used == 0:
        raise SwsDecodeError(f"{loc}no symbol has a code but the stream holds {count} symbols")
    kraft = sum(1 << (MAX_CODE_LENGTH - int(x)) for x in lengths if x)
    if kraft > 1 << MAX_CODE_LENGTH:
        raise SwsDecodeError(f"{loc}code lengths are over-subscribed (Kraft sum > 1)")


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Lookup table of ``2**maxlen`` int32 entries ``symbol << 5 | length`` (-1: no codeword)."""
    maxlen = int(lengths.max()) if lengths.size else 0
    maxlen = max(maxlen, 1)
    table = np.full(1 << maxlen, -1, dtype=np.int32)
    codes = canonical_codes(lengths)
    for sym in np.flatnonzero(lengths):
        n = int(lengths[sym])
        start = int(codes[sym]) << (maxlen - n)
        table[start : start + (1 << (maxlen - n))] = (int(sym) << 5) | n
    return table, maxlen


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy bound in bits of a stream with these symbol counts."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = c.sum()
    if total == 0:
        return 0.0
    return float(-(c * np.log2(c / total)).sum())
