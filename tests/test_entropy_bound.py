"""benchmarks/entropy_bound.py: the order-0 bound it reports, and the coder against it on tensors with no structure."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from entropy_bound import measure, order0_bits  # noqa: E402

sys.path.pop(0)


def test_order0_bits_counts_flags_and_values():
    # 4 flags at density 1/2 (1 bit each) and 2 values at 1/2 each (1 bit each)
    assert order0_bits(np.array([0, 0, 1, 2], np.uint8)) == pytest.approx(6.0)
    assert order0_bits(np.zeros(10, np.uint8)) == 0.0
    assert order0_bits(np.full(8, 3, np.uint8)) == 0.0


def test_context_coder_is_near_the_bound_on_structureless_tensors():
    """Independent flags and values: nothing for the contexts to find, so the coder pays the
    bound plus its learning cost (about 1% here) and never much less."""
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(1024, 256, generator=g) < 0.1
    levels = torch.linspace(-1, 1, 8)
    sd = {"a.weight": torch.where(keep, levels[torch.randint(0, 8, (1024, 256), generator=g)], torch.zeros(()))}
    r = measure(sd)
    assert r["tensors"] == ["a.weight"]
    assert 0.995 < r["coder_over_bound"] < 1.03
    assert r["best_generic_bytes"] > r["order0_bound_bytes"]
