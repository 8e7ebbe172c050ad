"""Load time of a .sws file against what users load instead, at several model sizes.

A model of ``N`` weights in 4096-wide float32 matrices, 5% non-zero with 15 shared values
(what soft weight-sharing leaves), is saved as .sws (format 3, default coder), with
torch.save, as safetensors and as zstd -3 of its raw bytes. Warm loads (files in the page
cache, every byte of the result touched) are timed interleaved, ``--repeat`` rounds, medians
and quartiles, in one process per thread count; the first load in a fresh process is timed
separately (interpreter start, imports and, for .sws, the numba kernels from their cache).

    python benchmarks/load_vs.py --sizes 1e6 1e7 1e8 --threads 1 2 --json benchmarks/load_vs.json --plot benchmarks/load_vs.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import touch  # noqa: E402

WIDTH = 4096


def model(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    values = torch.linspace(-0.1, 0.1, 16)
    values = values[values != 0][:15]
    sd, left, i = {}, n, 0
    while left > 0:
        rows = max(1, min(WIDTH, left // WIDTH))
        w = values[torch.randint(0, 15, (rows, WIDTH), generator=g)]
        w[torch.rand(rows, WIDTH, generator=g) >= 0.05] = 0
        sd[f"layer{i}.weight"] = w
        left -= rows * WIDTH
        i += 1
    return sd


def write_all(n: int, folder: Path) -> dict[str, Path]:
    from safetensors.torch import save_file

    import swsformat

    sd = model(n)
    paths = {k: folder / f"m{n}.{k}" for k in ("sws", "pt", "safetensors", "zst")}
    swsformat.encode(sd, paths["sws"])
    torch.save(sd, paths["pt"])
    save_file(sd, str(paths["safetensors"]))
    try:
        import zstandard

        raw = b"".join(t.numpy().tobytes() for t in sd.values())
        paths["zst"].write_bytes(zstandard.ZstdCompressor(level=3).compress(raw))
        (folder / f"m{n}.shapes").write_text(json.dumps({k: list(v.shape) for k, v in sd.items()}))
    except ImportError:
        del paths["zst"]
    return paths


def loaders(paths: dict[str, Path]) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    import swsformat

    out = {
        "sws dense": lambda: swsformat.load_state_dict(paths["sws"], max_output_bytes=1 << 40),
        "sws CSR": lambda: swsformat.load_state_dict(paths["sws"], sparse=True, max_output_bytes=1 << 40),
        "torch.load": lambda: torch.load(paths["pt"]),
        "torch.load mmap": lambda: torch.load(paths["pt"], mmap=True),
        "safetensors eager": lambda: load_file(str(paths["safetensors"])),
    }

    def lazy():
        with safe_open(str(paths["safetensors"]), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    out["safetensors lazy"] = lazy
    if "zst" in paths:
        import zstandard

        shapes = json.loads(paths["zst"].with_suffix(".shapes").read_text())

        def zst():
            raw = zstandard.ZstdDecompressor().decompress(paths["zst"].read_bytes())
            flat = torch.frombuffer(bytearray(raw), dtype=torch.float32)
            sd, at = {}, 0
            for k, s in shapes.items():
                n = int(np.prod(s))
                sd[k] = flat[at : at + n].view(s)
                at += n
            return sd

        out["zstd -3 raw"] = zst
    return out


def warm(paths: dict[str, Path], repeat: int) -> dict[str, dict[str, float]]:
    fns = loaders(paths)
    for fn in fns.values():  # first calls: page cache, numba kernels
        touch(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            touch(fn())
            times[k].append(time.perf_counter() - t)
    out = {}
    for k, v in times.items():
        q = statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3
        out[k] = {"median": statistics.median(v), "q1": q[0], "q3": q[2]}
    return out


FRESH = {
    "sws dense": "import swsformat, sys; swsformat.load_state_dict(sys.argv[1], max_output_bytes=1 << 40)",
    "torch.load": "import torch, sys; torch.load(sys.argv[1])",
}


def fresh(paths: dict[str, Path], repeat: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "NUMBA_NUM_THREADS": str(threads)}
    times: dict[str, list[float]] = {k: [] for k in FRESH}
    for _ in range(repeat):
        for k, code in FRESH.items():
            path = paths["sws" if k.startswith("sws") else "pt"]
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, str(path)], check=True, env=env)
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=float, default=[1e6, 1e7, 1e8])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--worker", nargs=2, metavar=("N", "FOLDER"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:  # one thread count, in its own process: torch's pool is sized once
        n, folder = int(a.worker[0]), Path(a.worker[1])
        paths = {k: folder / f"m{n}.{k}" for k in ("sws", "pt", "safetensors", "zst") if (folder / f"m{n}.{k}").exists()}
        print(json.dumps(warm(paths, a.repeat)))
        return
    from swsformat.provenance import provenance

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for size in a.sizes:
            n = int(size)
            paths = write_all(n, folder)
            row = {"weights": n, "bytes": {k: v.stat().st_size for k, v in paths.items()}, "warm": {}, "fresh": {}}
            for th in a.threads:
                env = {**os.environ, "OMP_NUM_THREADS": str(th), "NUMBA_NUM_THREADS": str(th)}
                out = subprocess.run([sys.executable, __file__, "--worker", str(n), str(folder), "--repeat", str(a.repeat)],
                                     check=True, env=env, capture_output=True, text=True).stdout
                row["warm"][th] = json.loads(out.strip().splitlines()[-1])
                row["fresh"][th] = fresh(paths, max(3, a.repeat // 2), th)
                w = row["warm"][th]
                base = w["torch.load"]["median"]
                print(f"{n:>11,} weights, {th} thread(s): " + ", ".join(f"{k} {v['median'] / base:.2f}x" for k, v in w.items())
                      + f"; fresh process: sws {row['fresh'][th]['sws dense']:.2f} s, torch.load {row['fresh'][th]['torch.load']:.2f} s")
            results.append(row)
            for f in folder.iterdir():
                f.unlink()
    record = {"command": "python benchmarks/load_vs.py " + " ".join(sys.argv[1:]), "provenance": provenance(ROOT),
              "results": results}
    if a.json:
        a.json.write_text(json.dumps(record, indent=2) + "\n")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(a.threads), figsize=(6 * len(a.threads), 4), squeeze=False)
        for ax, th in zip(axes[0], a.threads):
            for k in results[0]["warm"][th]:
                ax.plot([r["weights"] for r in results], [r["warm"][th][k]["median"] for r in results], "o-", label=k)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("weights (5% non-zero, 15 shared values)")
            ax.set_ylabel("warm load, every byte touched (s)")
            ax.set_title(f"{th} thread(s)")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)


if __name__ == "__main__":
    main()
