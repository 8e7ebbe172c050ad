"""Re-encode committed ``.sws`` files with ``smallest=True`` (tensors that do not get smaller
when coded are stored raw). The tensors are decoded and written back bit for bit, so every
measured error stays valid; the script first checks that re-encoding without the option
reproduces the original bytes exactly.

    python scripts/reencode_smallest.py results/paper/*.sws
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import swsformat
from swsformat.container import parse
from swsformat.encoder import atomic_write


def main(paths: list[str]) -> None:
    for p in map(Path, paths):
        original = p.read_bytes()
        c = parse(original)
        sd = swsformat.load(original)
        bits = {t.name: t.index_bits for t in c.tensors if t.kind == "sws"}
        kwargs = dict(compress=set(bits), index_bits=bits, metadata=c.metadata, architecture=c.architecture)
        if swsformat.encode_bytes(sd, **kwargs) != original:
            raise SystemExit(f"{p}: re-encoding does not reproduce the file; left unchanged")
        data = swsformat.encode_bytes(sd, smallest=True, **kwargs)
        again = swsformat.load(data)
        for name, t in sd.items():
            same = t.dtype == again[name].dtype and torch.equal(t.view(-1).view(torch.uint8), again[name].view(-1).view(torch.uint8))
            if not same:
                raise SystemExit(f"{p}: {name} changed; left unchanged")
        atomic_write(p, data)
        print(f"{p}: {len(original)} -> {len(data)} bytes")


if __name__ == "__main__":
    main(sys.argv[1:])
