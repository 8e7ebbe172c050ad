"""The two coders of format 3 side by side: size and decode time per tensor.

For every file given, its coded tensors are written again with ``coder="huffman"``,
``"context"`` and ``"auto"`` (same tensors, same settings otherwise): whole-file sizes, and
per tensor the bytes under each coder and the dense decode time per position (median of
``--repeat``, one thread). A synthetic layer (2304 x 768, the shape of GPT-2's attention
input projection, random normal pruned to ~10% and snapped to 15 values) shows the case
where the context coder gains nothing.

    python benchmarks/coders.py results/paper/*.sws --json benchmarks/coders.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import swsformat
from swsformat.decoder import decode_dense_array
from swsformat.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent


def _decode_ns(data: bytes, name: str, repeat: int) -> float:
    t = swsformat.open(data).tensor(name)
    decode_dense_array(t)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        decode_dense_array(t)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / max(math.prod(t.shape), 1) * 1e9


def compare(sd: dict[str, torch.Tensor], coded: set[str], repeat: int, **kwargs) -> dict:
    files = {c: swsformat.encode_bytes(sd, compress=coded, coder=c, **kwargs) for c in ("huffman", "context", "auto")}
    out = {"file_bytes": {c: len(d) for c, d in files.items()}, "tensors": {}}
    auto = swsformat.open(files["auto"])
    for name in sorted(coded):
        row = {"auto_picks": auto.entry(name).coder if auto.entry(name).kind == "sws" else "raw"}
        for c in ("huffman", "context"):
            f = swsformat.open(files[c])
            e = f.entry(name)
            if e.kind != "sws":
                continue
            row[f"{c}_bytes"] = e.stored_bytes + e.index_bytes
            row[f"{c}_ns_per_position"] = _decode_ns(files[c], name, repeat)
        out["tensors"][name] = row
    return out


def synthetic() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2304, 768, generator=g)
    return {"layer.weight": torch.where(w.abs() > 1.645, (w * 4).round().clamp(-7, 7) / 4, 0.0)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for path in a.files:
        f = swsformat.open(path)
        coded = {k for k in f.keys() if f.entry(k).kind == "sws"}
        sd = f.state_dict()
        results[str(path)] = compare(sd, coded, a.repeat, metadata=f.metadata(), architecture=f.architecture)
    results["synthetic 2304x768, 10% non-zero"] = compare(synthetic(), {"layer.weight"}, a.repeat)
    for where, r in results.items():
        print(f"{where}: whole file {r['file_bytes']}")
        for name, t in r["tensors"].items():
            if "huffman_bytes" in t and "context_bytes" in t:
                print(f"  {name:28s} huffman {t['huffman_bytes']:>8,} B {t['huffman_ns_per_position']:6.1f} ns/pos | "
                      f"context {t['context_bytes']:>8,} B {t['context_ns_per_position']:6.1f} ns/pos | auto: {t['auto_picks']}")
    if a.json:
        a.json.write_text(json.dumps({"command": "python benchmarks/coders.py " + " ".join(sys.argv[1:]),
                                      "threads": 1, "provenance": provenance(ROOT), "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
