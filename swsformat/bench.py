"""Timings a user can run on their own machine: ``sws bench FILE``.

Load time of the file (dense and sparse) against ``torch.load`` of the same weights saved
uncompressed, and inference latency dense vs sparse at batch 1 and 256, on CPU and on CUDA
when present. Every number is the best of several runs, measured in this process.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import torch

from .reader import PathLike, load_model, load_state_dict


def best_of(fn: Callable[[], object], repeat: int = 7, sync: bool = False) -> float:
    """Best wall time of one call in seconds (CUDA synchronised when ``sync``)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


# The built-in architectures all take MNIST-sized images.
INPUT_SHAPE = (1, 28, 28)


def run(
    path: PathLike, devices: list[str] | None = None, batches: tuple[int, ...] = (1, 256),
    max_output_bytes: int | None = None,
) -> dict[str, Any]:
    """Measure load and inference timings of a ``.sws`` file of a built-in architecture."""
    devices = devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    out: dict[str, Any] = {"file": str(path), "load": {}, "inference": {}}
    lim = max_output_bytes
    sd = load_state_dict(path, max_output_bytes=lim)
    buf = io.BytesIO()
    torch.save(sd, buf)
    raw = buf.getvalue()
    out["load"]["sws_dense_s"] = best_of(lambda: load_state_dict(path, max_output_bytes=lim))
    out["load"]["sws_sparse_s"] = best_of(lambda: load_state_dict(path, sparse=True, max_output_bytes=lim))
    out["load"]["torch_load_fp32_s"] = best_of(lambda: torch.load(io.BytesIO(raw), weights_only=True))
    for dev in devices:
        sync = dev.startswith("cuda")
        dense = load_model(path, device=dev, max_output_bytes=lim)
        sparse = load_model(path, device=dev, sparse=True, max_output_bytes=lim)
        for b in batches:
            x = torch.randn(b, *INPUT_SHAPE, device=dev)
            with torch.no_grad():
                d = best_of(lambda m=dense, x=x: m(x), sync=sync)
                s = best_of(lambda m=sparse, x=x: m(x), sync=sync)
            out["inference"][f"{dev}_batch{b}"] = {"dense_s": d, "sparse_s": s, "sparse_speedup": d / s}
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"{res['file']}"]
    ld = res["load"]
    lines.append(
        f"load: sws dense {ld['sws_dense_s'] * 1e3:.2f} ms, sws sparse {ld['sws_sparse_s'] * 1e3:.2f} ms, "
        f"torch.load fp32 {ld['torch_load_fp32_s'] * 1e3:.2f} ms"
    )
    for k, v in res["inference"].items():
        lines.append(
            f"{k:<16} dense {v['dense_s'] * 1e3:8.3f} ms  sparse {v['sparse_s'] * 1e3:8.3f} ms  "
            f"sparse speed-up {v['sparse_speedup']:.2f}x"
        )
    return "\n".join(lines)
