"""Type checks of config dataclasses, so that a bad ``--set`` fails before any training."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_SCALARS = {"int": int, "float": float, "str": str, "bool": bool}


def _fits(value: Any, kind: str) -> bool:
    kind = kind.strip()
    if kind == "None":
        return value is None
    if kind == "bool":
        return type(value) is bool
    if kind == "int":
        return type(value) is int and -(2**63) <= value < 2**63
    if kind == "float":
        return type(value) in (int, float) and math.isfinite(value)
    if kind == "str":
        return isinstance(value, str)
    if kind.startswith("tuple["):
        parts = [p.strip() for p in kind[6:-1].split(",")]
        if len(parts) == 2 and parts[1] == "...":  # tuple[X, ...]: any length
            return isinstance(value, tuple | list) and all(_fits(v, parts[0]) for v in value)
        return isinstance(value, tuple | list) and len(value) == len(parts) and all(_fits(v, p) for v, p in zip(value, parts))
    return True  # a type this checker does not know: left to the field's own checks


def check_types(obj: Any) -> None:
    """Raise ValueError naming the first field whose value does not fit its annotation
    (``int``, ``float`` (finite), ``str``, ``bool``, ``None``, unions and tuples of them)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        kinds = str(f.type).split("|")
        if not any(_fits(value, k) for k in kinds):
            raise ValueError(f"{f.name} must be {str(f.type).replace('float', 'finite float')}, got {value!r}")
