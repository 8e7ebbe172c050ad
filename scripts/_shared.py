"""Small helpers the example scripts share."""

from __future__ import annotations

import sysconfig
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch


def corpus(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bytes of the standard library's top-level modules: (train, held-out), every 10th file held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, held = bytearray(), bytearray()
    for i, f in enumerate(files):
        (held if i % 10 == 0 else train).extend(f.read_bytes())
    as_tensor = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8).long()  # noqa: E731
    return as_tensor(train[:limit]), as_tensor(held[: limit // 10])


def file_size(write: Callable[[Path], object]) -> int:
    """Bytes that ``write(path)`` puts in a fresh temporary file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f"
        write(path)
        return path.stat().st_size
