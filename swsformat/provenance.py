"""Where a measurement came from: written by the code into every results JSON.

A number without the code, machine, thread count and library versions that made it cannot
be compared or reproduced, so results files carry :func:`provenance` rather than notes.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

_PACKAGES = ("swsformat", "torch", "numpy", "numba", "msgpack", "dahuffman")


def git_commit(where: str | os.PathLike | None = None) -> dict[str, Any]:
    """The commit of the git work tree holding ``where`` (default: this package) and whether
    tracked files differ from it; ``None`` values outside a work tree (an installed wheel)."""
    cwd = Path(where) if where is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True,
            check=True, timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(status.strip())}


def cpu_name() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a result depends on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def provenance(where: str | os.PathLike | None = None) -> dict[str, Any]:
    """Commit, dirty flag, date, command line, machine, thread counts and versions."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        **git_commit(where),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[:],
        "machine": {
            "cpu": cpu_name(),
            "arch": platform.machine(),
            "os": platform.system(),
            "cores": os.cpu_count(),
            "gpu": gpu,
        },
        "threads": {"torch": torch.get_num_threads(), "numba": _numba_threads()},
        "versions": versions(),
    }


def _numba_threads() -> int | None:
    try:
        import numba

        return int(numba.get_num_threads())
    except Exception:  # numba missing or its threading layer unavailable: not a reason to fail a run
        return None


__all__ = ["cpu_name", "git_commit", "provenance", "versions"]
