"""Fuzz campaign for the .sws reader: mutate valid files, detect crashes, hangs and memory blow-ups.

Each input runs in a long-lived worker process under an address-space limit (RLIMIT_AS:
what the worker has mapped after start-up plus ``--mem-budget``) and a per-input time
limit; a worker that dies by a signal is a crash, one that does not answer in time is a
hang (it is killed and restarted). Every input goes to every public read entry point
(``open`` and its methods, ``load`` dense and sparse, ``load_state_dict``, ``load_model``,
``inspect``, ``read_header``, ``size_report``) and to the CLI (``info``, ``info --json``,
``decode``, ``eval``; ``bench`` and ``plot`` on every ``--slow-every``-th input). Any
exception other than SwsError is a bug, as is a CLI failure that is not one line on stderr.

    python scripts/fuzz.py --inputs 100000 --json results/fuzz/summary.json

Byte mutations: bit flips, byte sets, insertions, deletions, truncation at every offset,
damaged deflate streams and declared sizes of version 2 headers (header CRC recomputed).
Structure mutations decode the header, edit it and write it back with every section
re-laid and every CRC recomputed, so that the schema checks (not the CRCs) are what
stands: deleted keys, swapped types, extreme and off-by-one integers, shrunk and grown
lists and byte strings, and self-consistent edits (an empty tensor with arbitrary code
tables, a huge row count over zero columns, many tensors, deep or wide containers).
"""

from __future__ import annotations

import argparse
import json
import os
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from swsformat.provenance import provenance  # noqa: E402

EXTREMES = [-1, 0, 1, 7, 8, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1, -(2**63)]


def seeds() -> list[bytes]:
    """Valid files of both versions: goldens, small coded files, an all-zero coded tensor,
    half-precision and integer tensors, a 0-D tensor, and a built-in architecture."""
    import torch

    import swsformat

    g = torch.Generator().manual_seed(0)
    out = [(ROOT / "tests" / "data" / f"golden-v{v}.sws").read_bytes() for v in (1, 2, 3)]
    out.append((ROOT / "tests" / "data" / "golden-v3-kinds45.sws").read_bytes())
    cases = [((6, 20), 0.3, 5, None), ((4, 1, 3, 3), 0.5, 3, 2), ((3, 200), 0.02, 9, "auto"), ((2, 2), 1.0, 2, 1)]
    for i, (shape, density, k, bits) in enumerate(cases):
        vals = torch.linspace(-1, 1, k)
        w = torch.where(torch.rand(shape, generator=g) < density, vals[torch.randint(0, k, shape, generator=g)], torch.zeros(()))
        sd = {"a.weight": w, "a.bias": torch.ones(shape[0]), "tied.weight": w}
        for version in (1,) if i == 3 else (2, 3):
            out.append(swsformat.encode_bytes(sd, index_bits=bits, smallest=False, version=version))
        out.append(swsformat.encode_bytes(sd, smallest=False, coder="context"))
    odd = {
        "z.weight": torch.zeros(5, 7),
        "h.weight": torch.tensor([[0.0, 0.5], [0.25, 0.0]], dtype=torch.float16),
        "b.weight": torch.tensor([[0.0, -1.0, 2.0]], dtype=torch.bfloat16),
        "s": torch.tensor(3.0),
        "i": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "flag": torch.tensor([True, False]),
        "pruned.bias": torch.tensor([0.0] * 20 + [0.5, -1.0, 0.0, 3.0], dtype=torch.float16),
        "mask": torch.tensor([False] * 30 + [True, False, True]),
        "ids": torch.tensor([0] * 9 + [7, 0, -3], dtype=torch.int64).reshape(3, 4),
    }
    out.append(swsformat.encode_bytes(odd, compress=["z.weight", "h.weight", "b.weight"], metadata={"k": "v"}, smallest=False))
    out.append((ROOT / "results" / "paper" / "lenet300-100.sws").read_bytes())  # names its architecture
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
    """A byte-level or single-field mutation (checksums recomputed half of the time)."""
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
    if data[8] == 3:
        return mutate3(data, rng)
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


def mutate3(data: bytes, rng: random.Random) -> bytes:
    """A version 3 file with its index bytes edited (CRC fixed), or its tensors' fields or
    payloads changed and re-written with every CRC and length recomputed, unchecked."""
    import numpy as np

    from swsformat.container import (
        HEADER_DEFLATE,
        HEADER_MSGPACK,
        AliasTensor,
        ContextTensor,
        RawTensor,
        SparseRawTensor,
        SwsTensor,
        _serialize3,
        decode_header,
        pack_head,
        parse,
        read_prelude,
    )

    op = rng.randrange(5)
    if op <= 1:  # index bytes: flips, random bytes, inserted varints, deletions
        p = read_prelude(data)
        b = bytearray(decode_header(data, p))
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(b) + 1)
            how = rng.randrange(4)
            if how == 0 and i < len(b):
                b[i] ^= 1 << rng.randrange(8)
            elif how == 1 and i < len(b):
                b[i] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.getrandbits(8)])
            elif how == 2:
                b[i:i] = bytes([0xFF] * rng.randint(1, 10) + [rng.getrandbits(7)])
            else:
                del b[i : i + rng.randint(1, 4)]
        try:
            head = pack_head(bytes(b), 3, HEADER_DEFLATE if op == 1 and rng.random() < 0.5 else HEADER_MSGPACK)
        except Exception:  # an edit the deflate limits refuse: store it plain
            head = pack_head(bytes(b), 3, HEADER_MSGPACK)
        return head + data[p.data_start :]
    c = parse(data)
    t = rng.choice(c.tensors)
    i = c.tensors.index(t)
    payload = "positions" if isinstance(t, SparseRawTensor) and rng.random() < 0.7 else "values"
    if isinstance(t, ContextTensor | RawTensor):
        payload = "data"
    if op == 2 and not isinstance(t, AliasTensor | SwsTensor) and getattr(t, payload).size:  # payload, CRCs fixed
        d = bytearray(getattr(t, payload).tobytes())
        for _ in range(rng.randint(1, 6)):
            j = rng.randrange(len(d) + 1)
            if rng.random() < 0.7 and j < len(d):
                d[j] = rng.getrandbits(8)
            elif rng.random() < 0.5:
                d[j:j] = bytes([rng.getrandbits(8)])
            else:
                del d[j : j + 1]
        setattr(t, payload, np.frombuffer(bytes(d), dtype=np.uint8))
    elif op == 3 and isinstance(t, AliasTensor):
        t.target = rng.choice([x.name for x in c.tensors] + ["missing"])
    elif not isinstance(t, AliasTensor):  # a field set to an odd value
        field = rng.choice(["shape", "nonzeros", "codebook", "dtype", "estimator"])
        if field == "estimator" and isinstance(t, ContextTensor):  # kind 2 <-> 4: same bytes, other model
            t.counting = not t.counting
        elif field == "shape":
            t.shape = tuple(rng.choice([0, 1, 2, 3, 7, 2**31, 2**40, *t.shape]) for _ in range(rng.randint(0, 4)))
        elif field == "nonzeros" and hasattr(t, "nonzeros"):
            t.nonzeros = max(0, min(2**62, t.nonzeros + rng.choice([-2, -1, 1, 2, 1000, 2**40])))
        elif field == "codebook" and hasattr(t, "codebook"):
            t.codebook = t.codebook[: rng.randrange(t.codebook.size + 1)]
        elif field == "dtype":
            t.dtype = rng.choice(["float16", "bfloat16", "float64", "float32", "int8", "bool"])
            if hasattr(t, "codebook") and t.dtype in ("float16", "bfloat16", "float64", "float32"):
                from swsformat.spec import SWS_DTYPES
                t.codebook = t.codebook.astype(SWS_DTYPES[t.dtype])
    if rng.random() < 0.2:  # a tensor moved
        c.tensors.insert(rng.randrange(len(c.tensors) + 1), c.tensors.pop(i))
    try:
        return _serialize3(c, check=False)
    except Exception:  # a field the writer cannot even pack (e.g. an int8 codebook): a truncation instead
        return data[: rng.randrange(len(data))]


# ------------------------------------------------------------------------ structure mutations

_SECTION_ORDER = {"raw": ("data",), "sws": ("row_counts", "gaps", "values")}
ODD_INTS = [-(2**64), -(2**63) - 1, -1, 0, 1, 2, 15, 16, 17, 255, 256, 1023, 1024, 1025, 4095, 4096,
            2**31 - 1, 2**31, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
ODD_VALUES = [None, True, False, 0, -1, 1.5, float("nan"), "", "x", "sws", "raw", "huffman", b"", b"\x00" * 3,
              [], [0], [0, 0, 0], {}, {"a": 1}, [[[]]]]


def _section_refs(tensor: dict) -> list[tuple[Any, str]]:
    """(holder, key) of every section reference of one tensor entry, in file order."""
    kind = tensor.get("kind")
    refs = []
    order = _SECTION_ORDER.get(kind, ()) if isinstance(kind, str) else ()
    for name in order or ("data", "row_counts", "gaps", "values"):
        v = tensor.get(name)
        if isinstance(v, dict):
            if "section" in v:
                refs.append((v, "section"))
        elif name in tensor:
            refs.append((tensor, name))
    return refs


def relayout(header: Any, payload: bytes, version: int) -> bytes:
    """Lay every section out canonically from the bytes it referenced (or zeros for new
    sections), with offsets, lengths and CRCs that agree: only the schema can object."""
    from swsformat.container import section_start

    out = bytearray()
    tensors = header.get("tensors") if isinstance(header, dict) else None
    if not isinstance(tensors, list):
        return bytes(out)
    for t in tensors:
        if not isinstance(t, dict):
            continue
        for holder, key in _section_refs(t):
            ref = holder[key]
            chunk = b""
            if isinstance(ref, list) and len(ref) == 3 and all(type(x) is int for x in ref[:2]):
                off, length = ref[0], ref[1]
                if 0 <= off <= len(payload) and 0 <= length <= 1 << 24:
                    chunk = payload[off : off + length]
            elif isinstance(ref, bytes):
                chunk = ref
            aligned = t.get("kind") == "raw"
            here = section_start(len(out), version, aligned)
            out += bytes(here - len(out)) + chunk
            holder[key] = [here, len(chunk), zlib.crc32(chunk)]
    return bytes(out)


def _random_path(rng: random.Random, header: Any, want=None):
    paths = [(p, v) for p, v in _paths(header) if want is None or isinstance(v, want)]
    return rng.choice(paths) if paths else (None, None)


def _set(header: Any, path: tuple, value: Any) -> None:
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    parent[path[-1]] = value


def _delete(header: Any, path: tuple) -> None:
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    del parent[path[-1]]


def _nested(depth: int) -> Any:
    v: Any = []
    for _ in range(depth):
        v = [v]
    return v


DEEP_MARKER = "__deep__"


def _pack(header: Any, version: int, coding: int | None, deep: int = 0) -> bytes:
    """Header bytes without the writer's checks (pack_head refuses some hostile headers).
    With ``deep``, the string DEEP_MARKER becomes arrays nested ``deep`` levels (deeper
    than msgpack's packer or Python's recursion would build)."""
    import msgpack

    from swsformat.spec import MAGIC

    raw = msgpack.packb(header, use_bin_type=True)
    if deep:
        raw = raw.replace(msgpack.packb(DEEP_MARKER), b"\x91" * deep + b"\x90", 1)
    if version == 1:
        head = MAGIC + struct.pack("<HHI", 1, 0, len(raw)) + raw
    else:
        stored = raw
        if coding == 1 or (coding is None and len(raw) > 64):
            c = zlib.compressobj(9, zlib.DEFLATED, -15, 9)
            stored = c.compress(raw) + c.flush()
            coding = 1
        else:
            coding = 0
        head = MAGIC + struct.pack("<HBBII", 2, coding, 0, len(stored), len(raw)) + stored
    head += struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
    return head + bytes(-len(head) % 8)


def _clip(v: int) -> int:
    """msgpack packs integers in [-2**63, 2**64); clip the rest so the input can be written."""
    return max(-(2**63), min(v, 2**64 - 1))


def mutate_structure(data: bytes, rng: random.Random) -> bytes:
    """Decode the header, edit its structure, re-encode it consistently."""
    if data[8] == 3:
        return mutate3(data, rng)
    version, header, payload = _split(data)
    tensors = header["tensors"]
    op = rng.randrange(12)
    coding = None
    deep = 0
    if op == 0:  # delete a key or an element anywhere
        path, _ = _random_path(rng, header)
        if path:
            _delete(header, path)
    elif op == 1:  # swap a value's type
        path, _ = _random_path(rng, header)
        if path:
            _set(header, path, rng.choice(ODD_VALUES))
    elif op == 2:  # extreme and off-by-one integers
        path, v = _random_path(rng, header, int)
        if path:
            _set(header, path, _clip(rng.choice([v - 1, v + 1, v - 2, v + 2, v * 2, -v] + ODD_INTS)))
    elif op == 3:  # shrink or grow a list
        path, v = _random_path(rng, header, list)
        if path:
            if v and rng.random() < 0.5:
                del v[rng.randrange(len(v)) :]
            else:
                v.extend(rng.choice([v[-1] if v else 0, 0, 1, 2**20, "x", {}]) for _ in range(rng.choice([1, 2, 17])))
    elif op == 4:  # shrink or grow a byte string
        path, v = _random_path(rng, header, bytes)
        if path:
            if v and rng.random() < 0.5:
                _set(header, path, v[: rng.randrange(len(v))])
            else:
                _set(header, path, v + bytes(rng.getrandbits(8) for _ in range(rng.choice([1, 2, 16, 600]))))
    elif op == 5:  # an empty coded tensor with arbitrary code tables
        sws = [t for t in tensors if t.get("kind") == "sws"]
        if sws:
            t = rng.choice(sws)
            t.update(nonzeros=0, entries=0, row_bits=rng.choice([0, 0, 1, 40]), row_counts=b"")
            for s in ("gaps", "values"):
                n = len(t[s]["code"])
                t[s]["code"] = bytes(rng.choice([0x00, 0x11, 0xFF, 0x1F, 0xF1, rng.getrandbits(8)]) for _ in range(n))
                t[s]["bits"] = rng.choice([0, 0, 1, 8])
                t[s]["section"] = b""
    elif op == 6:  # a huge row count over zero columns (or zero rows over huge columns)
        t = rng.choice(tensors)
        big = rng.choice([2**20, 2**24, 2**29, 2**31, 2**40, 2**62])
        t["shape"] = rng.choice([[big, 0], [big, 0, 7], [0, big], [big], [big, 1, 0]])
        if t.get("kind") == "sws":
            t.update(nonzeros=0, entries=0, row_bits=0, row_counts=b"")
            for s in ("gaps", "values"):
                t[s]["bits"], t[s]["section"] = 0, b""
        else:
            t["data"] = b""
    elif op == 7:  # many tensors
        # A valid header of n tensors costs every entry point real work for each (10,000: about
        # 0.4 s each, 100,000: 4 s), so large valid counts come rarely; 100,001 is refused at once.
        n = rng.choice([100, 1000, 100_001, 100_001]) if rng.random() < 0.97 else rng.choice([10_000, 99_999, 100_000])
        empty = {"name": "", "kind": "raw", "dtype": "float32", "shape": [0], "data": b""}
        header["tensors"] = tensors + [dict(empty, name=f"t{i}") for i in range(n)]
    elif op == 8:  # deep containers
        depth = rng.choice([5, 12, 13, 15, 16, 17, 64, 1000, 100_000])
        deep, value = (depth, DEEP_MARKER) if depth > 64 else (0, _nested(depth))
        where = rng.randrange(3)
        if where == 0:
            header["architecture"] = {"name": "lenet300-100", "kwargs": {"num_classes": value}}
        elif where == 1:
            header["metadata"] = {"k": value}
        else:
            tensors[0]["shape"] = value
    elif op == 9:  # wide containers
        n = rng.choice([1000, 65_536, 100_001, 1_000_000])
        what = rng.randrange(3)
        if what == 0:
            header["metadata"] = {f"k{i}": "" for i in range(n)}
        elif what == 1:
            header["architecture"] = {"name": "x", "kwargs": {"a": [{} for _ in range(n)]}}
        else:
            tensors[0]["shape"] = [1] * n
    elif op == 10:  # code tables at and past the Kraft limit
        sws = [t for t in tensors if t.get("kind") == "sws"]
        if sws:
            t = rng.choice(sws)
            s = rng.choice(["gaps", "values"])
            n = len(t[s]["code"]) * 2
            lengths = [rng.choice([0, 1, 2, 15]) for _ in range(n)]
            if rng.random() < 0.5:
                lengths = [1, 1] + [0] * (n - 2) if rng.random() < 0.5 else [1, 1, 1] + [0] * (n - 3)
            from swsformat.spec import pack_nibbles

            t[s]["code"] = pack_nibbles(lengths[:n])
    else:  # an architecture that is not what the tensors fit, or hostile constructor arguments
        header["architecture"] = rng.choice([
            {"name": "lenet300-100", "kwargs": {"num_classes": rng.choice([-1, 0, 2**40, "x", None, 1.5, [1]])}},
            {"name": "lenet5-caffe", "kwargs": {}},
            {"name": "nope", "kwargs": {}},
            {"name": "lenet300-100", "kwargs": {"bogus": 1}},
            {"name": "lenet300-100"},
            {"name": 5, "kwargs": {}},
        ])
    if rng.random() < 0.85:
        payload = relayout(header, payload, version)
    else:
        _rebuild(header, payload, True, version)  # keep the edited numbers, fix only the CRCs
    if version == 2:
        coding = rng.choice([None, 0, 1])
    return _pack(header, version, coding, deep) + payload


# ------------------------------------------------------------------------------------ worker

ENTRY_POINTS = ("open", "load", "load_sparse", "load_state_dict", "load_model", "inspect", "read_header",
                "size_report", "cli_info", "cli_info_json", "cli_decode", "cli_eval")
SLOW_ENTRY_POINTS = ("cli_bench", "cli_plot")


def _cli(argv: list[str]) -> None:
    """Run the CLI in-process; a failure must be one line on stderr (foreign exceptions
    propagate, since SWS_DEBUG is set in the worker)."""
    import contextlib
    import io

    from swsformat.cli import main

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    lines = err.getvalue().splitlines()
    if code != 0 and (len(lines) != 1 or not lines[0].startswith("sws: error: ")):
        raise AssertionError(f"CLI {argv[0]} exit {code} wrote {len(lines)} stderr lines: {err.getvalue()[:200]!r}")


def _entry_points(data: bytes, path: str, tmp: str, slow: bool):
    import swsformat
    from swsformat.plotting import plot_file  # noqa: F401 - imported so that its import is not timed

    def use_open():
        with swsformat.open(data) as f:
            f.keys(), f.metadata(), f.architecture, f.version
            for k in f.keys()[:4]:
                f.entry(k)
                f.get_tensor(k)
                f.get_tensor(k, sparse=True)

    calls = {
        "open": use_open,
        "load": lambda: swsformat.load(data),
        "load_sparse": lambda: swsformat.load(data, sparse=True),
        "load_state_dict": lambda: swsformat.load_state_dict(path),
        "load_model": lambda: swsformat.load_model(path),
        "inspect": lambda: swsformat.inspect(path),
        "read_header": lambda: swsformat.read_header(path),
        "size_report": lambda: swsformat.size_report(data),
        "cli_info": lambda: _cli(["info", path]),
        "cli_info_json": lambda: _cli(["info", path, "--json"]),
        "cli_decode": lambda: _cli(["decode", path, "-o", tmp + ".pt"]),
        "cli_eval": lambda: _cli(["eval", path]),
    }
    if slow:
        calls["cli_bench"] = lambda: _cli(["bench", path, "--device", "cpu"])
        calls["cli_plot"] = lambda: _cli(["plot", path, "-o", tmp])
    return calls


def _patch_for_speed() -> None:
    """The worker's eval uses 512 real test images, loaded once; bench times one run."""
    import functools

    from swsformat import bench
    from swsformat.retrain import data as data_mod

    original = data_mod.load

    @functools.lru_cache(maxsize=4)
    def cached(name="mnist", root=None, normalization="unit", **kw):
        try:
            train, test = original(name, root=root, normalization=normalization)
        except Exception:  # no data on this machine: random images of the right shape
            import torch

            g = torch.Generator().manual_seed(0)
            test = data_mod.Split(torch.rand(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g))
            train = test
        return train.subset(16), test.subset(512)

    data_mod.load = cached
    timed = bench.interleaved
    bench.interleaved = lambda fns, repeat=1, sync=False: timed(fns, 1, sync)


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def worker(mem_budget: int, slow_every: int) -> None:
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import swsformat

    os.environ["SWS_DEBUG"] = "1"
    _patch_for_speed()
    folder = tempfile.mkdtemp(prefix="sws-fuzz-")
    path, tmp = os.path.join(folder, "in.sws"), os.path.join(folder, "out")
    for i, s in enumerate(seeds()):  # compile every kernel and import every module before the limits apply
        with open(path, "wb") as f:
            f.write(s)
        for name, call in _entry_points(s, path, tmp, slow=True).items():
            try:
                call()
            except swsformat.SwsError:
                pass
            except Exception as exc:
                raise RuntimeError(f"seed {i} fails {name}: {exc!r}") from exc
    limit = _vm_bytes() + mem_budget
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    out.write(b"ready\n")
    out.flush()
    n = 0
    while True:
        head = inp.read(4)
        if len(head) < 4:
            return
        data = inp.read(struct.unpack("<I", head)[0])
        n += 1
        result = "ok"
        try:
            with open(path, "wb") as f:
                f.write(data)
        except OSError as exc:
            result = f"other:harness:{exc}"
        if result == "ok":
            for name, call in _entry_points(data, path, tmp, slow=n % slow_every == 0).items():
                try:
                    call()
                except swsformat.SwsError:
                    result = "sws_error" if result == "ok" else result
                except MemoryError:
                    result = f"memory_error:{name}"
                    break
                except Exception as exc:  # noqa: BLE001 - any other exception is what we hunt for
                    result = f"other:{name}:{type(exc).__name__}:{str(exc)[:200]}"
                    break
        out.write(result.replace("\n", " ").encode() + b"\n")
        out.flush()


class Runner:
    def __init__(self, timeout: float, mem_budget: int, slow_every: int = 100) -> None:
        self.timeout, self.mem_budget, self.slow_every, self.proc = timeout, mem_budget, slow_every, None

    def start(self) -> None:
        """Start a worker and wait (without the per-input limit) until its kernels are compiled."""
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--mem-budget", str(self.mem_budget),
             "--slow-every", str(self.slow_every)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        ready, _, _ = select.select([self.proc.stdout], [], [], 900)
        if not ready or self.proc.stdout.readline() != b"ready\n":
            self.proc.kill()
            self.close()  # no pipes left open behind the error
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


def campaign(inputs: int, seed: int, timeout: float, mem_budget: int, out_dir: Path | None,
             structure: float = 0.75, slow_every: int = 100, progress: bool = False,
             truncations: bool = True) -> dict:
    rng = random.Random(seed)
    origin = provenance(ROOT)  # the code under test is what the worker imports now
    pool = seeds()
    runner = Runner(timeout, mem_budget, slow_every)
    counts: Counter[str] = Counter()
    by_kind: Counter[str] = Counter()
    examples: dict[str, str] = {}
    t0 = time.time()
    cases: list[bytes] = []
    for s in pool[:6] if truncations else []:  # every truncation of the small seeds, then random mutations
        cases.extend(s[:n] for n in range(len(s)))
    done = 0
    while done < inputs:
        if done < len(cases):
            data, kind = cases[done], "truncation"
        elif rng.random() < structure:
            try:
                data, kind = mutate_structure(rng.choice(pool), rng), "structure"
            except Exception:  # a generator bug must not end the campaign; counted, never hidden
                data, kind = mutate(rng.choice(pool), rng), "bytes_after_generator_error"
            if len(data) > 64 << 20:  # the worker's pipe and the campaign's pace: keep inputs small
                continue
        else:
            data, kind = mutate(rng.choice(pool), rng), "bytes"
        result = runner.run(data)
        outcome = result.split(":", 1)[0]
        counts[outcome] += 1
        by_kind[kind] += 1
        if outcome in ("crash", "hang", "other", "memory_error"):
            name = f"{outcome}-{counts[outcome]}.sws"
            if out_dir is not None:
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / name).write_bytes(data)
            examples.setdefault(result[:300], name)
        done += 1
        if progress and done % 1000 == 0:
            print(f"{done} inputs, {dict(counts)}, {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    runner.close()
    return {
        "command": "python scripts/fuzz.py " + " ".join(sys.argv[1:]),
        "inputs": done,
        "inputs_by_mutation": dict(by_kind),
        "seed": seed,
        "entry_points": list(ENTRY_POINTS),
        "slow_entry_points": {"names": list(SLOW_ENTRY_POINTS), "every_nth_input": slow_every},
        "per_input_timeout_s": timeout,
        "memory_budget_bytes": mem_budget,
        "results": dict(counts),
        "crashes": counts["crash"],
        "hangs": counts["hang"],
        "other_exceptions": counts["other"] + counts["memory_error"],
        "examples": examples,
        "seconds": round(time.time() - t0, 1),
        "provenance": origin,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=100_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=30.0,
                   help="seconds per input (all its entry points together) before it counts as a hang")
    p.add_argument("--mem-budget", type=int, default=1 << 30,
                   help="bytes of address space an input may add to the worker's (default 1 GiB)")
    p.add_argument("--structure", type=float, default=0.75, help="share of structure-aware mutations")
    p.add_argument("--slow-every", type=int, default=100, help="run bench and plot on every N-th input")
    p.add_argument("--json", default=None)
    p.add_argument("--keep", default=None, help="folder for inputs that crash, hang or raise a foreign exception")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        worker(a.mem_budget, a.slow_every)
        return 0
    summary = campaign(a.inputs, a.seed, a.timeout, a.mem_budget, Path(a.keep) if a.keep else None,
                       a.structure, a.slow_every, progress=True)
    text = json.dumps(summary, indent=2)
    print(text)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    return 0 if summary["crashes"] == summary["hangs"] == summary["other_exceptions"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
