"""Where CSR beats dense on this machine: the density below which ``torch.sparse.mm`` of a
CSR weight is faster than ``F.linear`` of the dense one, per batch size (what
``sparse="auto"`` decides with; see ``swsformat.sparse.CROSSOVER``).

    python benchmarks/sparse_crossover.py --threads 1 2 --json benchmarks/sparse_crossover.json

Square layers of 1024 and 4096, float32, densities 0.5-50%, batch
1/16/64/256; sparse and dense timed interleaved, medians of repeats.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from swsformat.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent
DENSITIES = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
BATCHES = [1, 16, 64, 256]
SHAPES = [(1024, 1024), (4096, 4096)]


def measure(out_f: int, in_f: int, density: float, batch: int, repeat: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < density)
    csr = w.to_sparse_csr()
    x = torch.randn(batch, in_f, generator=g)
    dense_t, sparse_t = [], []
    with torch.no_grad():
        for _ in range(2):
            torch.nn.functional.linear(x, w)
            torch.sparse.mm(csr, x.t())
        for _ in range(repeat):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            t1 = time.perf_counter()
            torch.sparse.mm(csr, x.t())
            t2 = time.perf_counter()
            dense_t.append(t1 - t0)
            sparse_t.append(t2 - t1)
    return statistics.median(dense_t), statistics.median(sparse_t)


def crossover(rows: list[dict], batch: int) -> float:
    """Largest measured density at which CSR won for every shape (0 if it never did)."""
    best = 0.0
    for d in DENSITIES:
        cells = [r for r in rows if r["batch"] == batch and r["density"] == d]
        if cells and all(r["speedup"] > 1.0 for r in cells):
            best = d
        else:
            break
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    out = {
        "command": "python benchmarks/sparse_crossover.py " + " ".join(sys.argv[1:]),
        "provenance": provenance(ROOT),
        "method": "medians of interleaved dense/sparse timings; speedup = dense / sparse",
        "by_threads": {},
    }
    for threads in a.threads:
        torch.set_num_threads(threads)
        rows = []
        for out_f, in_f in SHAPES:
            for d in DENSITIES:
                for b in BATCHES:
                    dense, sparse = measure(out_f, in_f, d, b, a.repeat)
                    rows.append({"shape": f"{out_f}x{in_f}", "density": d, "batch": b,
                                 "dense_s": dense, "csr_s": sparse, "speedup": dense / sparse})
                    print(f"{threads} thr {out_f}x{in_f} density {d:.3f} batch {b:>3}: dense {dense * 1e3:7.3f} ms "
                          f"csr {sparse * 1e3:7.3f} ms  x{dense / sparse:.2f}", file=sys.stderr, flush=True)
        out["by_threads"][str(threads)] = {
            "rows": rows,
            "crossover_density": {str(b): crossover(rows, b) for b in BATCHES},
        }
    text = json.dumps(out, indent=1)
    if a.json:
        Path(a.json).write_text(text + "\n")
    print(json.dumps({t: v["crossover_density"] for t, v in out["by_threads"].items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
