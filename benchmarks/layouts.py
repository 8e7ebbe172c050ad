"""Flat layouts a user might try on quantized tensors before a generic compressor, shared by
the benchmark scripts (``generic_compressors.py``, ``real_models.py``)."""

from __future__ import annotations

import numpy as np
import torch


def uint8_csr(rows: np.ndarray, cols: np.ndarray, symbols: np.ndarray, nrows: int) -> bytes:
    """CSR of non-zeros listed row by row: uint32 count per row, then uint8 gaps (zeros since
    the previous non-zero of the row; a run of 255 or more is bridged by 255-gaps carrying
    symbol 0), then the uint8 symbols. Vectorised: no Python loop per weight."""
    prev = np.full(cols.size, -1, dtype=np.int64)
    same_row = rows[1:] == rows[:-1]
    prev[1:] = np.where(same_row, cols[:-1], -1)
    gap = cols - prev - 1
    fill = gap // 255
    order = np.concatenate([np.repeat(np.arange(gap.size), fill), np.arange(gap.size)])  # fillers first
    gaps = np.concatenate([np.full(int(fill.sum()), 255, np.uint8), (gap % 255).astype(np.uint8)])
    syms = np.concatenate([np.zeros(int(fill.sum()), np.uint8), symbols.astype(np.uint8)])
    idx = np.argsort(order, kind="stable")
    counts = np.bincount(rows, minlength=nrows).astype("<u4")
    return counts.tobytes() + gaps[idx].tobytes() + syms[idx].tobytes()


def touch(sd: dict[str, torch.Tensor]) -> float:
    """Read every element: torch.load and safetensors map storages lazily, so an untouched
    load costs nothing."""
    return float(sum(float(t.float().sum()) if t.layout == torch.strided else float(t.values().float().sum())
                     for t in sd.values()))
