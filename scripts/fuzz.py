"""Fuzz campaign for the .sws reader: mutate valid files, detect crashes, hangs and memory blow-ups.

Each input runs in a long-lived worker process under a memory limit (RLIMIT_AS) and a
per-input time limit; a worker that dies by a signal is a crash, one that does not answer
in time is a hang (it is killed and restarted). Any exception other than SwsError is a bug.

    python scripts/fuzz.py --inputs 100000 --json results/fuzz/summary.json

Mutations: bit flips, byte sets, insertions, deletions, truncation at every offset, damaged
deflate streams and declared sizes of version 2 headers (header CRC recomputed), header
fields set to extreme values (huge or negative sizes, overflowing offsets, nnz mismatch,
invalid code tables, out-of-range symbols), with checksums recomputed half of the time so
that the deeper checks and the numba kernels see the damage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import select
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXTREMES = [-1, 0, 1, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)]


def seeds() -> list[bytes]:
    import torch

    import swsformat

    g = torch.Generator().manual_seed(0)
    out = [(ROOT / "tests" / "data" / f"golden-v{v}.sws").read_bytes() for v in (1, 2)]
    cases = [((6, 20), 0.3, 5, None), ((4, 1, 3, 3), 0.5, 3, 2), ((3, 200), 0.02, 9, "auto"), ((2, 2), 1.0, 2, 1)]
    for i, (shape, density, k, bits) in enumerate(cases):
        vals = torch.linspace(-1, 1, k)
        w = torch.where(torch.rand(shape, generator=g) < density, vals[torch.randint(0, k, shape, generator=g)], torch.zeros(()))
        sd = {"a.weight": w, "a.bias": torch.ones(shape[0])}
        out.append(swsformat.encode_bytes(sd, index_bits=bits, version=1 if i == 3 else 2))
    return out


def _split(data: bytes):
    """(version, header map, data area) of a valid file."""
    from swsformat.container import decode_header, read_prelude

    prelude = read_prelude(data)
    return prelude.version, decode_header(data, prelude), data[prelude.data_start :]


def _rebuild(header, payload: bytes, fix_sections: bool, version: int, coding: int | None = None) -> bytes:
    import msgpack

    from swsformat.container import pack_head

    tensors = header.get("tensors") if isinstance(header, dict) else None
    if fix_sections and isinstance(tensors, list):
        for t in tensors:
            if not isinstance(t, dict):
                continue
            streams = [t.get(s) for s in ("gaps", "values")]
            refs = [t.get("data"), t.get("row_counts")] + [s.get("section") for s in streams if isinstance(s, dict)]
            for ref in refs:
                if isinstance(ref, list) and len(ref) == 3 and all(isinstance(x, int) and 0 <= x < 2**40 for x in ref[:2]):
                    ref[2] = zlib.crc32(payload[ref[0] : ref[0] + ref[1]])
    return pack_head(msgpack.packb(header, use_bin_type=True), version, coding) + payload


def _damage_deflated_header(data: bytes, rng: random.Random) -> bytes:
    """Corrupt the deflate stream of a version 2 header, or its declared size, and recompute
    the header CRC so that the inflater sees it."""
    from swsformat.container import read_prelude

    p = read_prelude(data)
    stored = bytearray(data[p.length : p.length + p.stored])
    size = p.size
    what = rng.randrange(4)
    if what == 0:
        for _ in range(rng.randint(1, 4)):
            stored[rng.randrange(len(stored))] = rng.getrandbits(8)
    elif what == 1:
        del stored[rng.randrange(len(stored)) :]
    elif what == 2:
        stored += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 8)))
    else:
        size = rng.choice([1, size - 1, size + 1, 2**24, rng.randrange(1, 2**24)])
    head = data[:10] + struct.pack("<BBII", 1, 0, len(stored), max(size, 1)) + bytes(stored)
    head += struct.pack("<I", zlib.crc32(head))
    return head + bytes(-len(head) % 8) + data[p.data_start :]


def _paths(obj, prefix=()):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield prefix + (k,), v
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield prefix + (i,), v
            yield from _paths(v, prefix + (i,))


def mutate(data: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(9)
    b = bytearray(data)
    if op == 0:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return bytes(b)
    if op == 1:
        i = rng.randrange(len(b))
        b[i] = rng.getrandbits(8)
        return bytes(b)
    if op == 2:
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        return bytes(b)
    if op == 3:
        i = rng.randrange(len(b))
        del b[i : i + rng.randint(1, 16)]
        return bytes(b)
    if op == 4:
        return bytes(b[: rng.randrange(len(b))])
    version, header, payload = _split(data)
    if op == 8:
        if version == 2 and data[10] == 1:
            return _damage_deflated_header(data, rng)
        op = 5
    fix = rng.random() < 0.5
    if op == 5:  # a header field set to an extreme value
        paths = [p for p, v in _paths(header) if isinstance(v, (int, bytes, str, list))]
        path = rng.choice(paths)
        parent = header
        for k in path[:-1]:
            parent = parent[k]
        choice = rng.random()
        if choice < 0.6:
            parent[path[-1]] = rng.choice(EXTREMES)
        elif choice < 0.8:
            parent[path[-1]] = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 40)))
        else:
            parent[path[-1]] = rng.choice([None, "x", [], {}, [1, 2], 1.5, True])
        return _rebuild(header, payload, fix, version)
    if op == 6:  # damage a payload stream with checksums fixed: the kernels must catch it
        p = bytearray(payload)
        for _ in range(rng.randint(1, 6)):
            if p:
                p[rng.randrange(len(p))] = rng.getrandbits(8)
        return _rebuild(header, bytes(p), True, version)
    # op 7: random code tables / counts that disagree with the streams
    sws = [t for t in header["tensors"] if t.get("kind") == "sws"]
    if not sws:
        return bytes(b)
    t = rng.choice(sws)
    field = rng.choice(["gaps", "values", "nonzeros", "entries", "row_bits", "codebook"])
    if field in ("gaps", "values"):
        n = len(t[field]["code"])
        t[field]["code"] = bytes(rng.choice([0x00, 0x11, 0xFF, 0x1F, 0xF1, rng.getrandbits(8)]) for _ in range(n))
        if rng.random() < 0.3:
            t[field]["bits"] = rng.choice(EXTREMES[:8])
    elif field == "codebook":
        t["codebook"] = t["codebook"][: rng.randrange(len(t["codebook"]) + 1)]
    else:
        t[field] = max(0, t[field] + rng.choice([-2, -1, 1, 2, 1000]))
    return _rebuild(header, payload, True, version)


# ------------------------------------------------------------------------------------ worker


def worker(mem_limit: int) -> None:
    import swsformat

    for s in seeds():  # compile every kernel signature before the limits apply
        swsformat.load(s)
    resource.setrlimit(resource.RLIMIT_AS, (mem_limit, mem_limit))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        data = inp.read(struct.unpack("<I", head)[0])
        try:
            swsformat.load(data)
            result = "ok"
        except swsformat.SwsError:
            result = "sws_error"
        except MemoryError:
            result = "memory_error"
        except Exception as exc:  # noqa: BLE001 - any other exception is what we hunt for
            result = f"other:{type(exc).__name__}:{str(exc)[:200]}"
        out.write(result.encode() + b"\n")
        out.flush()


class Runner:
    def __init__(self, timeout: float, mem_limit: int) -> None:
        self.timeout, self.mem_limit, self.proc = timeout, mem_limit, None

    def start(self) -> None:
        """Start a worker and wait (without the per-input limit) until its kernels are compiled."""
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--mem-limit", str(self.mem_limit)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 600)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            raise RuntimeError("fuzz worker failed to start")

    def run(self, data: bytes) -> str:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        try:
            self.proc.stdin.write(struct.pack("<I", len(data)) + data)
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        if not ready:
            self.proc.kill()
            self.close()
            return "hang"
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.close()
            return f"crash:{signal.Signals(-code).name if code < 0 else code}"
        return line.decode().strip()

    def close(self) -> None:
        if self.proc is not None:
            for pipe in (self.proc.stdin, self.proc.stdout):
                try:
                    pipe.close()
                except BrokenPipeError:
                    pass
            self.proc.wait()
            self.proc = None


def campaign(inputs: int, seed: int, timeout: float, mem_limit: int, out_dir: Path | None) -> dict:
    rng = random.Random(seed)
    pool = seeds()
    runner = Runner(timeout, mem_limit)
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    t0 = time.time()
    cases: list[bytes] = []
    for s in pool:  # every truncation of every seed, then random mutations
        cases.extend(s[:n] for n in range(len(s)))
    done = 0
    while done < inputs:
        data = cases[done] if done < len(cases) else mutate(rng.choice(pool), rng)
        result = runner.run(data)
        kind = result.split(":", 1)[0]
        counts[kind] += 1
        if kind in ("crash", "hang", "other", "memory_error") and out_dir is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{kind}-{counts[kind]}.sws").write_bytes(data)
            examples.setdefault(result, f"{kind}-{counts[kind]}.sws")
        done += 1
    runner.close()
    return {
        "command": "python scripts/fuzz.py " + " ".join(sys.argv[1:]),
        "inputs": done,
        "seed": seed,
        "per_input_timeout_s": timeout,
        "memory_limit_bytes": mem_limit,
        "results": dict(counts),
        "crashes": counts["crash"],
        "hangs": counts["hang"],
        "other_exceptions": counts["other"] + counts["memory_error"],
        "examples": examples,
        "seconds": round(time.time() - t0, 1),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per input before it counts as a hang")
    p.add_argument("--mem-limit", type=int, default=3 << 30, help="address-space limit of the worker in bytes")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", default=None, help="folder for inputs that crash, hang or raise a foreign exception")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.mem_limit)
        return 0
    summary = campaign(a.inputs, a.seed, a.timeout, a.mem_limit, Path(a.keep) if a.keep else None)
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    return 0 if summary["crashes"] == summary["hangs"] == summary["other_exceptions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
