"""Re-encode committed ``.sws`` files without touching a single weight: at the current format
version (``--version``), optionally with ``smallest=True`` (``--smallest``: tensors that do
not get smaller when coded are stored raw).

The tensors are decoded and written back bit for bit, so every measured error stays valid.
Before writing, the script checks that re-encoding at the file's own version reproduces its
bytes exactly (with its library string) and, after re-encoding, that every tensor decodes
bit-identical; otherwise the file is left unchanged.

    python scripts/reencode.py results/paper/*.sws
    python scripts/reencode.py --smallest --version 2 results/paper/*.sws
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import swsformat
from swsformat.container import parse, serialize
from swsformat.encoder import to_container
from swsformat.files import atomic_write
from swsformat.spec import FORMAT_VERSION, VERSIONS


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def reencode(path: Path, version: int, smallest: bool) -> tuple[int, int]:
    original = path.read_bytes()
    c = parse(original)
    sd = swsformat.load(original)
    bits = {t.name: t.index_bits for t in c.tensors if t.kind == "sws"}
    kwargs = dict(compress=set(bits), index_bits=bits, metadata=c.metadata, architecture=c.architecture)
    same = to_container(sd, version=c.version, **kwargs)
    same.library = c.library
    if serialize(same) != original:
        raise SystemExit(f"{path}: re-encoding does not reproduce the file; left unchanged")
    new = to_container(sd, version=version, smallest=smallest, **kwargs)
    data = serialize(new)
    again = swsformat.load(data)
    for name, t in sd.items():
        if not _same(t, again[name]):
            raise SystemExit(f"{path}: {name} changed; left unchanged")
    atomic_write(path, data)
    return len(original), len(data)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--version", type=int, default=FORMAT_VERSION, choices=VERSIONS)
    p.add_argument("--smallest", action="store_true")
    a = p.parse_args(argv)
    for f in a.files:
        before, after = reencode(f, a.version, a.smallest)
        print(f"{f}: {before} -> {after} bytes (format version {a.version})")


if __name__ == "__main__":
    main()
