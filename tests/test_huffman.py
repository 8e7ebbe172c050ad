"""Canonical Huffman code lengths, including the length limit real streams rarely reach."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import swsformat
from swsformat.huffman import canonical_codes, code_lengths, entropy_bits
from swsformat.spec import MAX_CODE_LENGTH


def fibonacci(n: int) -> np.ndarray:
    f = [1, 1]
    while len(f) < n:
        f.append(f[-1] + f[-2])
    return np.array(f[:n], dtype=np.int64)


def kraft(lengths: np.ndarray) -> float:
    used = lengths[lengths > 0].astype(np.float64)
    return float((2.0 ** -used).sum())


def test_unlimited_huffman_would_exceed_the_limit_and_lengths_are_flattened():
    counts = fibonacci(MAX_CODE_LENGTH + 8)  # an unlimited Huffman tree is n - 1 = 22 deep
    lengths = code_lengths(counts, max_length=64)
    assert lengths.max() == counts.size - 1
    limited = code_lengths(counts)
    assert limited.max() <= MAX_CODE_LENGTH
    assert kraft(limited) <= 1.0
    # The flattening costs little against the optimal unlimited code.
    cost = lambda ls: float((counts * ls).sum())  # noqa: E731
    assert cost(limited) <= 1.01 * cost(lengths)
    assert cost(lengths) >= entropy_bits(counts)


@pytest.mark.parametrize("limit", [2, 3, 4, 5])
def test_small_limits_are_honoured(limit):
    counts = fibonacci(1 << limit)  # exactly as many symbols as codes of `limit` bits
    lengths = code_lengths(counts, max_length=limit)
    assert lengths.max() <= limit and kraft(lengths) <= 1.0
    with pytest.raises(ValueError, match="cannot have codes"):
        code_lengths(fibonacci((1 << limit) + 1), max_length=limit)


def test_canonical_codes_are_prefix_free():
    lengths = code_lengths(fibonacci(20))
    codes = canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths) if n]
    assert len(set(words)) == len(words)
    assert not any(a != b and b.startswith(a) for a in words for b in words)


def test_single_and_no_symbol():
    assert code_lengths(np.array([0, 5, 0])).tolist() == [0, 1, 0]
    assert code_lengths(np.zeros(4, dtype=np.int64)).tolist() == [0, 0, 0, 0]


def test_a_stream_that_needs_the_limit_round_trips():
    """Shared values with Fibonacci frequencies: the value stream's code is length-limited."""
    counts = fibonacci(24)[::-1].copy()
    values = torch.linspace(0.1, 2.4, counts.size)
    flat = torch.repeat_interleave(values, torch.from_numpy(counts))
    flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))]
    t = flat.reshape(1, -1)
    data = swsformat.encode_bytes({"w.weight": t}, coder="huffman")
    assert torch.equal(swsformat.load(data)["w.weight"], t)
    entry = swsformat.open(data).entry("w.weight")
    assert code_lengths(counts, max_length=64).max() > MAX_CODE_LENGTH  # the limit was needed
    assert entry.kind == "sws" and 0 < max(entry.value_lengths) <= MAX_CODE_LENGTH
