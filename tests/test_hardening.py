"""Hardening: a bounded fuzz slice in separate processes, pure-Python kernels, no pickle on load."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

import pytest
import torch

import swsformat

from .conftest import DATA, ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import fuzz  # noqa: E402


@pytest.mark.slow
def test_fuzz_slice_in_worker_processes():
    """A bounded slice of the campaign (structure and byte mutations through every read entry
    point and CLI command): crashes, hangs and foreign exceptions fail the test."""
    summary = fuzz.campaign(inputs=int(os.environ.get("SWS_FUZZ_INPUTS", "1500")), seed=1, timeout=30.0,
                            mem_budget=1 << 30, out_dir=None, slow_every=50, truncations=False)
    assert summary["inputs_by_mutation"]["structure"] > 1000
    assert summary["crashes"] == 0 and summary["hangs"] == 0 and summary["other_exceptions"] == 0, summary


def test_fuzz_runner_detects_a_crash():
    """The harness itself must see a segfault: feed it a worker that crashes."""
    runner = fuzz.Runner(timeout=20.0, mem_budget=1 << 30)
    runner.proc = subprocess.Popen(
        [sys.executable, "-c", "import ctypes, sys; sys.stdin.buffer.read(4); ctypes.string_at(0)"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert runner.run(b"x").startswith("crash:SIG")


def _digest_script() -> str:
    """Digest of the golden files decoded dense and sparse, and of a truncation's error."""
    goldens = [str(DATA / f"golden-v{v}.sws") for v in (1, 2, 3)]
    return (
        "import hashlib, swsformat, torch\n"
        "h = hashlib.sha256()\n"
        f"for path in {goldens!r}:\n"
        "    sd = swsformat.load_state_dict(path)\n"
        "    sp = swsformat.load_state_dict(path, sparse=True)\n"
        "    for k in sd: h.update(k.encode()); h.update(sd[k].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())\n"
        "    for k in sp:\n"
        "        t = sp[k]\n"
        "        if t.layout == torch.sparse_csr:\n"
        "            for part in (t.crow_indices(), t.col_indices(), t.values()): h.update(part.contiguous().view(torch.uint8).numpy().tobytes())\n"
        "    try:\n"
        "        swsformat.load(open(path, 'rb').read()[:-5])\n"
        "    except swsformat.SwsError as e: h.update(str(e).encode())\n"
        "print(h.hexdigest())\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"NUMBA_DISABLE_JIT": "1"}, {"NUMBA_BOUNDSCHECK": "1"}])
def test_same_results_without_jit_and_with_boundscheck(env):
    base = subprocess.run([sys.executable, "-c", _digest_script()], capture_output=True, text=True, check=True)
    other = subprocess.run([sys.executable, "-c", _digest_script()], capture_output=True, text=True, check=True,
                           env={**os.environ, **env})
    assert base.stdout == other.stdout and len(base.stdout.strip()) == 64


@pytest.mark.slow
def test_format_and_reader_tests_pass_with_numba_bounds_checks(tmp_path):
    """The bad-file, reader, round-trip and golden tests again with every kernel compiled with
    bounds checks (in a cache of its own): an out-of-bounds access raises IndexError there."""
    if os.environ.get("NUMBA_BOUNDSCHECK"):
        pytest.skip("already running with bounds checks")
    env = {**os.environ, "NUMBA_BOUNDSCHECK": "1", "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    tests = [str(ROOT / "tests" / f) for f in ("test_bad_files.py", "test_reader.py", "test_roundtrip.py", "test_golden.py",
                                                "test_format3.py")]
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


def test_load_never_unpickles(monkeypatch):
    # Warm up first: numba reads its own cache index (a pickle it wrote under __pycache__)
    # when a kernel is first used in a process; the file being loaded never goes near pickle.
    swsformat.load_state_dict(DATA / "golden-v1.sws")
    swsformat.load_state_dict(DATA / "golden-v1.sws", sparse=True)
    swsformat.size_report(DATA / "golden-v1.sws")

    def forbidden(*a, **k):
        raise AssertionError("pickle or torch.load used on the load path")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    sd = swsformat.load_state_dict(DATA / "golden-v1.sws")
    assert "fc.weight" in sd
    swsformat.load_state_dict(DATA / "golden-v1.sws", sparse=True)
    swsformat.size_report(DATA / "golden-v1.sws")
    swsformat.inspect(DATA / "golden-v1.sws")


@pytest.mark.slow
def test_import_with_unwritable_cache_and_home(tmp_path):
    """numba's cache must not break import or decoding when nothing can be written."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    env = {**os.environ, "HOME": str(ro), "NUMBA_CACHE_DIR": str(ro / "cache"), "XDG_CACHE_HOME": str(ro)}
    r = subprocess.run([sys.executable, "-c", _digest_script()], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert hashlib.sha256(b"").hexdigest() != r.stdout.strip()


def test_kernels_fall_back_to_no_cache(monkeypatch):
    """A read-only install: numba raises for cache=True, the decorator retries without it."""
    import numba

    from swsformat.kernels import njit

    real = numba.njit

    def picky(*a, cache=False, **k):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real(*a, **k)

    monkeypatch.setattr(numba, "njit", picky)

    @njit(nogil=True)
    def add(a, b):
        return a + b

    assert add(2, 3) == 5
