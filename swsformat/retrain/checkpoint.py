"""Training checkpoints that say when they cannot be trusted.

A checkpoint file is ``SWSCKPT1``, the SHA-256 of the payload, then the payload (a
``torch.save`` of tensors and plain values, read back with ``weights_only=True``). The
payload records a fingerprint of the settings that wrote it, so a resume with other
settings, a damaged file or a finished run is refused with a clear error and the file kept.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any

import torch

from ..errors import SwsCheckpointError
from ..files import atomic_write

MAGIC = b"SWSCKPT1"


def fingerprint(settings: Any) -> str:
    """A short digest of JSON-able settings (config, seed, data, model shapes)."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save(path: str | os.PathLike, state: dict[str, Any], settings_fingerprint: str) -> None:
    """Write ``state`` atomically with its digest and the fingerprint of its settings."""
    buf = io.BytesIO()
    torch.save({**state, "fingerprint": settings_fingerprint}, buf)
    payload = buf.getvalue()
    atomic_write(path, MAGIC + hashlib.sha256(payload).digest() + payload)


def load(path: str | os.PathLike, settings_fingerprint: str | None, map_location: Any = None) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save` for the same settings (``None``: any
    settings, e.g. to inspect one); never modifies the file."""
    try:
        with open(path, "rb") as f:
            blob = f.read()
    except OSError as exc:
        raise SwsCheckpointError(f"checkpoint {os.fsdecode(path)} cannot be read: {exc.strerror or exc}") from None
    if blob[:8] != MAGIC or len(blob) < 40:
        raise SwsCheckpointError(
            f"checkpoint {os.fsdecode(path)} is not a swsformat checkpoint (or is cut short); "
            "move it away to start the run afresh"
        )
    payload = blob[40:]
    if hashlib.sha256(payload).digest() != blob[8:40]:
        raise SwsCheckpointError(
            f"checkpoint {os.fsdecode(path)} is corrupt (its SHA-256 does not match); it was kept: "
            "restore it from a copy, or move it away to start the run afresh"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # the digest matched, so this is a checkpoint of another torch
        raise SwsCheckpointError(f"checkpoint {os.fsdecode(path)} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict) or (settings_fingerprint is not None and state.get("fingerprint") != settings_fingerprint):
        raise SwsCheckpointError(
            f"checkpoint {os.fsdecode(path)} was written by a run with other settings (config, seed, data, "
            "model or number of torchrun processes differ); resume with the settings it was started with, or move "
            "it away to start afresh"
        )
    return state
