"""Timings a user can run on their own machine: ``sws bench FILE``.

Load time of the file (dense and sparse) against ``torch.load`` of the same weights saved
uncompressed, and inference latency dense vs sparse at batch 1 and 256, on CPU and on CUDA
when present. The candidates of each comparison run interleaved, round after round, so a
busy machine slows them alike; each is reported as the median with its quartiles, and a
comparison whose quartiles spread more than :data:`NOISY` of the median is flagged.
"""

from __future__ import annotations

import io
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .errors import SwsFormatError
from .reader import PathLike, SwsFile, load_model, load_state_dict

# Interquartile range over median above which a timing is called noisy.
NOISY = 0.25

# Largest random input (numbers) a timing run builds: the shape comes from the file.
MAX_BENCH_INPUT = 1 << 26

# Input shape when the file records none (the built-in architectures take MNIST images).
DEFAULT_INPUT_SHAPE = (1, 28, 28)


def summarize(times: list[float]) -> dict[str, float]:
    """Median, quartiles and minimum in seconds, and the relative spread (IQR / median)."""
    q1, med, q3 = statistics.quantiles(times, n=4, method="inclusive") if len(times) > 1 else (times[0],) * 3
    return {"median_s": med, "p25_s": q1, "p75_s": q3, "min_s": min(times), "spread": (q3 - q1) / med if med else 0.0}


def interleaved(fns: dict[str, Callable[[], object]], repeat: int = 15, sync: bool = False) -> dict[str, dict[str, float]]:
    """Time every function ``repeat`` times, one of each per round (after one warm-up call each)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if sync:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if sync:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: summarize(t) for name, t in times.items()}


def run(
    path: PathLike, devices: list[str] | None = None, batches: tuple[int, ...] = (1, 256),
    max_output_bytes: int | None = None, repeat: int = 15,
) -> dict[str, Any]:
    """Measure load and inference timings of a ``.sws`` file of a built-in architecture."""
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    with SwsFile(path, max_output_bytes=max_output_bytes) as f:
        try:
            spec = f.input_spec()
        except SwsFormatError:
            spec = None
    shape = tuple(spec["shape"]) if spec and "shape" in spec else DEFAULT_INPUT_SHAPE
    if math.prod(shape) * max(batches) > MAX_BENCH_INPUT:
        raise SwsFormatError(
            f"the file's input shape {list(shape)} at batch {max(batches)} exceeds {MAX_BENCH_INPUT} numbers; "
            "time it with swsformat.bench.interleaved on inputs of your choice"
        )
    out: dict[str, Any] = {"file": str(path), "threads": torch.get_num_threads(), "repeat": repeat, "load": {},
                           "inference": {}}
    lim = max_output_bytes
    buf = io.BytesIO()
    torch.save(load_state_dict(path, max_output_bytes=lim), buf)
    raw = buf.getvalue()
    out["load"] = interleaved({
        "sws_dense": lambda: load_state_dict(path, max_output_bytes=lim),
        "sws_sparse": lambda: load_state_dict(path, sparse=True, max_output_bytes=lim),
        "torch_load_fp32": lambda: torch.load(io.BytesIO(raw), weights_only=True),
    }, repeat)
    for dev in devices:
        sync = dev.startswith("cuda")
        dense = load_model(path, device=dev, max_output_bytes=lim)
        sparse = load_model(path, device=dev, sparse=True, max_output_bytes=lim)
        for b in batches:
            x = torch.randn(b, *shape, device=dev)
            with torch.no_grad():
                res = interleaved({"dense": lambda x=x, m=dense: m(x), "sparse": lambda x=x, m=sparse: m(x)}, repeat, sync)
            res["sparse_speedup"] = res["dense"]["median_s"] / res["sparse"]["median_s"]
            out["inference"][f"{dev}_batch{b}"] = res
    out["noisy"] = noisy(out)
    return out


def noisy(res: dict[str, Any]) -> list[str]:
    """The measurements whose spread is above :data:`NOISY`."""
    found = [f"load {k}" for k, v in res["load"].items() if v["spread"] > NOISY]
    for case, v in res["inference"].items():
        found += [f"{case} {k}" for k in ("dense", "sparse") if v[k]["spread"] > NOISY]
    return found


def _ms(s: dict[str, float]) -> str:
    return f"{s['median_s'] * 1e3:.3f} ms ({s['p25_s'] * 1e3:.3f}-{s['p75_s'] * 1e3:.3f})"


def format_table(res: dict[str, Any]) -> str:
    ld = res["load"]
    lines = [
        f"{res['file']}: medians (quartiles) of {res['repeat']} interleaved runs, {res['threads']} threads",
        f"load: sws dense {_ms(ld['sws_dense'])}, sws sparse {_ms(ld['sws_sparse'])}, "
        f"torch.load fp32 {_ms(ld['torch_load_fp32'])}",
    ]
    for k, v in res["inference"].items():
        lines.append(f"{k:<16} dense {_ms(v['dense'])}  sparse {_ms(v['sparse'])}  "
                     f"sparse speed-up {v['sparse_speedup']:.2f}x")
    return "\n".join(lines)
