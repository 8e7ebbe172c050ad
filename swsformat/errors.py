"""The one exception family raised for bad ``.sws`` files and bad encoder input.

Every problem with a file (truncated, corrupted, hostile) surfaces as a subclass of
:class:`SwsError`, itself a :class:`ValueError`, so callers need a single ``except``.
"""

from __future__ import annotations


class SwsError(ValueError):
    """Base class of every error swsformat raises about file contents or encoder input."""


class SwsFormatError(SwsError):
    """The bytes are not a valid ``.sws`` file (bad magic, version, layout or header)."""


class SwsChecksumError(SwsFormatError):
    """A CRC-32 over the header or a section does not match: the file is corrupted."""


class SwsDecodeError(SwsFormatError):
    """A payload stream is inconsistent with its header (bad code, wrong count, overrun)."""


class SwsEncodeError(SwsError):
    """The input cannot be encoded (e.g. a tensor that is not quantized)."""


def where(tensor: str | None, field: str | None = None) -> str:
    """Format the location prefix used in every message: ``tensor 'fc1.weight', field 'gaps'``."""
    parts = []
    if tensor is not None:
        parts.append(f"tensor {tensor!r}")
    if field is not None:
        parts.append(f"field {field!r}")
    return ", ".join(parts) + ": " if parts else ""


class SwsOutputError(SwsError):
    """An output path that cannot or must not be written (missing folder, its own input)."""


class SwsCheckpointError(SwsError):
    """A training checkpoint is corrupt, from other settings, or of a finished run."""


class SwsDataError(SwsError, FileNotFoundError):
    """Training or evaluation data that is missing, fails its checksum or is malformed."""


class SwsBatchError(SwsError, TypeError):
    """Training data the loop cannot use: an iterator one epoch would exhaust, batches that are
    not ``(inputs, targets)`` pairs or whose samples cannot be counted."""


class SwsTrainingError(SwsError):
    """Compression produced a model not worth writing (lost its weights, fell to chance)."""


class SwsConfigError(SwsError, RuntimeError):
    """A method used with settings or in an order it cannot work with (no weights selected,
    a bad ``dataset_size``, ``finetune_`` before ``finalize_``)."""

