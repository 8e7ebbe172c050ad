"""Atomic writes: no temp files left by dead writers, no output onto its own input."""

from __future__ import annotations

import os
import time

import pytest
import torch

import swsformat
from swsformat.files import _host, atomic_write, check_output, clean_stale_temps


def _dead_pid() -> int:
    pid = 4_000_000  # above Linux's pid_max default: no such process
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    dead = tmp_path / f".m.sws.sws-tmp-{_host()}-{_dead_pid()}-abc123"
    live = tmp_path / f".m.sws.sws-tmp-{_host()}-{os.getpid()}-def456"
    remote_new = tmp_path / ".m.sws.sws-tmp-otherhost-1-ghi789"
    remote_old = tmp_path / ".x.sws.sws-tmp-otherhost-1-jkl012"
    unrelated = tmp_path / ".m.sws.12345.tmp"
    for p in (dead, live, remote_new, remote_old, unrelated):
        p.write_bytes(b"partial")
    day_ago = time.time() - 2 * 24 * 3600
    os.utime(remote_old, (day_ago, day_ago))
    swsformat.encode({"a.weight": torch.zeros(2, 2)}, tmp_path / "m.sws")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["m.sws", live.name, remote_new.name, unrelated.name])
    assert clean_stale_temps(tmp_path) == []


def test_write_replaces_a_symlink_not_its_target(tmp_path):
    target = tmp_path / "target.bin"
    target.write_bytes(b"keep me")
    link = tmp_path / "out.sws"
    link.symlink_to(target)
    atomic_write(link, b"new")
    assert not link.is_symlink() and link.read_bytes() == b"new" and target.read_bytes() == b"keep me"


def test_check_output_refuses_its_input_and_missing_folders(tmp_path):
    src = tmp_path / "in.pt"
    src.write_bytes(b"x")
    with pytest.raises(swsformat.SwsOutputError, match="is the input file"):
        check_output(src, src)
    hard = tmp_path / "hard.pt"
    os.link(src, hard)
    with pytest.raises(swsformat.SwsOutputError, match="is the input file"):
        check_output(hard, src)
    with pytest.raises(swsformat.SwsOutputError, match="does not exist"):
        check_output(tmp_path / "no" / "x.sws")
    with pytest.raises(swsformat.SwsOutputError, match="is a directory"):
        check_output(tmp_path)
    assert check_output(tmp_path / "new.sws", src, None) == tmp_path / "new.sws"


def test_a_planted_temp_name_with_a_huge_pid_does_not_break_writes(tmp_path):
    for pid in ("2147483648", "99999999999999999999"):
        (tmp_path / f".x.sws.sws-tmp-{_host()}-{pid}-a").write_bytes(b"")
    atomic_write(tmp_path / "x.sws", b"data")
    assert (tmp_path / "x.sws").read_bytes() == b"data"
