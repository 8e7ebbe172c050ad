"""Canonical Huffman codes: lengths from dahuffman, codes and decode tables rebuilt from lengths.

Only code *lengths* are stored in a file (one byte per symbol, as deflate does); both sides
derive the same canonical codes from them. dahuffman's own tables are not canonical and its
``save``/``load`` use pickle, so they never touch a file.
"""

from __future__ import annotations

import numpy as np
from dahuffman import HuffmanCodec

from . import kernels
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
    """Canonical codes for ``lengths``: by increasing length, then symbol index (as deflate)."""
    return kernels.canonical_codes(np.asarray(lengths, dtype=np.uint8))


def decode_table(lengths: np.ndarray) -> tuple[np.ndarray, int]:
    """Lookup table of ``2**maxlen`` int32 entries ``symbol << 5 | length`` (-1: no codeword).

    The lengths must have passed :func:`swsformat.container.check_code_lengths` (Kraft's
    inequality), so that every codeword's range fits the table.
    """
    table, maxlen = kernels.decode_table(np.asarray(lengths, dtype=np.uint8))
    return table, int(maxlen)


def entropy_bits(counts: np.ndarray) -> float:
    """Empirical entropy bound in bits of a stream with these symbol counts."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    total = c.sum()
    if total == 0:
        return 0.0
    return float((c * np.log2(total / c)).sum())  # a sum of non-negative terms: no "-0" for one symbol
