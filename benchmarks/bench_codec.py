"""Huffman decoding: the numba table decoder against dahuffman's pure-Python decode."""

from __future__ import annotations

import numpy as np
from dahuffman import HuffmanCodec

from swsformat import kernels
from swsformat.huffman import canonical_codes, code_lengths, decode_table

from .conftest import best_of, record

N = 1_000_000


def _stream():
    rng = np.random.default_rng(0)
    p = np.array([0.4, 0.2, 0.1, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01])
    symbols = rng.choice(p.size, N, p=p)
    lengths = code_lengths(np.bincount(symbols, minlength=p.size))
    codes = canonical_codes(lengths)
    widths = lengths[symbols]
    bits = int(widths.sum())
    data = kernels.pack_bits(codes[symbols].astype(np.int64), widths, bits)
    return symbols, lengths, data, bits


def test_huffman_decode_vs_dahuffman(benchmark):
    symbols, lengths, data, bits = _stream()
    table, maxlen = decode_table(lengths)
    kernels.decode_symbols(data, bits, table, maxlen, N)  # compile outside the timing

    def ours():
        out, status = kernels.decode_symbols(data, bits, table, maxlen, N)
        assert status == 0
        return out

    got = benchmark(ours)
    assert np.array_equal(got, symbols)
    codec = HuffmanCodec.from_frequencies({int(s): int(c) for s, c in enumerate(np.bincount(symbols))})
    encoded = codec.encode(symbols.tolist())
    baseline = best_of(lambda: codec.decode(encoded), repeat=1)
    ratio = record(benchmark, "huffman decode 1M symbols", benchmark.stats.stats.min, baseline, "dahuffman")
    assert ratio > 1.0  # sanity only; the target (>= 100x) is reported, not asserted


def test_huffman_encode_vs_dahuffman(benchmark):
    symbols, lengths, _, _ = _stream()
    codes = canonical_codes(lengths)

    def ours():
        widths = lengths[symbols]
        return kernels.pack_bits(codes[symbols].astype(np.int64), widths, int(widths.sum()))

    benchmark(ours)
    codec = HuffmanCodec.from_frequencies({int(s): int(c) for s, c in enumerate(np.bincount(symbols))})
    as_list = symbols.tolist()
    baseline = best_of(lambda: codec.encode(as_list), repeat=1)
    record(benchmark, "huffman encode 1M symbols", benchmark.stats.stats.min, baseline, "dahuffman")
