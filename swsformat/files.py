"""Safe writes shared by every command that writes: atomic replace, no output onto its own
input, and no temp files left behind by a writer that was killed.

A write goes to ``.NAME.sws-tmp-HOST-PID-RANDOM`` in the target folder, is fsynced, then
renamed over ``NAME``: readers see the old file or the new one, never a part. A symlink at
``NAME`` is replaced by the new file (as ``mv`` does); the file it pointed to is untouched.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import time
from pathlib import Path

from .errors import SwsOutputError

TEMP_TAG = ".sws-tmp-"
# A temp file of a writer on another machine (shared folder) is judged by age alone.
STALE_AFTER_S = 24 * 3600
_TEMP = re.compile(r"^\..+\.sws-tmp-(?P<host>[^-]*)-(?P<pid>\d{1,10})-[^/]*$")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64]


def _alive(pid: int) -> bool:
    if not 0 < pid < 1 << 22:  # above Linux's largest pid_max: no such process
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove temp files of our naming pattern whose writer is gone (its process no longer
    exists on this machine, or the file is older than a day); return what was removed."""
    removed = []
    now, host = time.time(), _host()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _TEMP.match(name)
        if m is None:
            continue
        path = Path(folder) / name
        try:
            age = now - path.lstat().st_mtime
            local = m["host"] == host
            if (local and not _alive(int(m["pid"]))) or age > STALE_AFTER_S:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed


def _file_mode(path: Path) -> int:
    """The mode a plain ``open(path, "w")`` would give: the old file's (not a symlink's
    target's: the link is replaced), else 0o666 & ~umask."""
    try:
        if path.is_symlink():
            raise FileNotFoundError
        return path.stat().st_mode & 0o777
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def check_output(path: str | os.PathLike, *inputs: str | os.PathLike | None) -> Path:
    """Fail early, before any work, if ``path`` cannot be written or is one of ``inputs``."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise SwsOutputError(f"output {path} is a directory")
    if not parent.is_dir():
        raise SwsOutputError(f"output folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SwsOutputError(f"output folder {parent} is not writable")
    for inp in inputs:
        if inp is None:
            continue
        try:
            same = os.path.samefile(path, inp)
        except OSError:
            same = os.path.abspath(path) == os.path.abspath(inp)
        if same:
            raise SwsOutputError(f"output {path} is the input file {inp}: choose another output path")
    return path


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync and rename.

    On any failure the temp file is removed and an existing file at ``path`` is untouched;
    stale temp files of killed writers in that folder are removed first.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    clean_stale_temps(folder)
    prefix = f".{path.name}{TEMP_TAG}{_host()}-{os.getpid()}-"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix)
    try:
        os.chmod(tmp, _file_mode(path))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
