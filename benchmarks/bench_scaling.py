"""Scaling: a synthetic VGG-16-sized model (138M weights, 16 shared values) encoded and decoded.

Decoding runs in a fresh process so that its peak memory can be compared with the dense
fp32 output it produces: on Linux the peak (VmHWM) is reset through /proc/self/clear_refs
just before each decode, so the import and the numba compile do not hide it. Set SWS_BENCH_SCALE=0.1 for a smaller, quicker model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import swsformat

SCALE = float(os.environ.get("SWS_BENCH_SCALE", "1"))

VGG16 = [
    (64, 3, 3, 3), (64, 64, 3, 3), (128, 64, 3, 3), (128, 128, 3, 3), (256, 128, 3, 3), (256, 256, 3, 3),
    (256, 256, 3, 3), (512, 256, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3), (512, 512, 3, 3),
    (512, 512, 3, 3), (4096, 25088), (4096, 4096), (1000, 4096),
]


def synthetic(sparsity: float, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    values = np.linspace(-0.1, 0.1, 16, dtype=np.float32)
    values = values[values != 0][:15]
    sd = {}
    for i, shape in enumerate(VGG16):
        shape = (max(1, int(shape[0] * SCALE)),) + shape[1:]
        n = int(np.prod(shape))
        w = np.zeros(n, dtype=np.float32)
        k = int(round(n * (1 - sparsity)))
        w[rng.choice(n, k, replace=False)] = values[rng.integers(0, values.size, k)]
        sd[f"layer{i}.weight"] = torch.from_numpy(w.reshape(shape))
    return sd


DECODE = """
import json, resource, sys, time
import swsformat

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return None

data = open(sys.argv[1], "rb").read()
swsformat.load(open(sys.argv[2], "rb").read())  # compile (or load numba's cache) outside the measurement
best, peak_extra = 1e9, 0
for _ in range(3):
    base = rss("VmRSS:")
    if base is not None:
        open("/proc/self/clear_refs", "w").write("5")  # Linux: reset the peak (VmHWM) to the current RSS
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter(); sd = swsformat.load(data, max_output_bytes=1 << 40); best = min(best, time.perf_counter() - t0)
    peak = rss("VmHWM:") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_extra = max(peak_extra, peak - base)
    out_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
print(json.dumps({"decode_s": best, "peak_extra_bytes": peak_extra, "output_bytes": out_bytes}))
"""


@pytest.mark.parametrize("sparsity", [0.95, 0.99])
def test_vgg16_sized_encode_decode(benchmark, sparsity, tmp_path):
    sd = synthetic(sparsity)
    weights = sum(t.numel() for t in sd.values())
    t0 = time.perf_counter()
    data = swsformat.encode_bytes(sd)
    encode_s = time.perf_counter() - t0
    path = tmp_path / "vgg.sws"
    path.write_bytes(data)
    small = tmp_path / "small.sws"
    swsformat.encode({"w.weight": torch.zeros(2, 2)}, small)
    res = benchmark.pedantic(
        lambda: json.loads(subprocess.run([sys.executable, "-c", DECODE, str(path), str(small)], check=True,
                                          capture_output=True, text=True).stdout),
        rounds=1, iterations=1,
    )
    nnz = int(weights * (1 - sparsity))
    benchmark.extra_info.update(
        weights=weights, sparsity=sparsity, file_bytes=len(data), encode_s=encode_s,
        encode_weights_per_s=weights / encode_s, decode_s=res["decode_s"],
        decode_weights_per_s=weights / res["decode_s"], decode_nonzeros_per_s=nnz / res["decode_s"],
        peak_over_output=res["peak_extra_bytes"] / res["output_bytes"],
    )
    print(f"\nVGG-16-sized, {sparsity:.0%} zeros: {weights / 1e6:.1f}M weights, file {len(data) / 1e6:.2f} MB, "
          f"encode {encode_s:.2f} s, decode {res['decode_s']:.2f} s, peak memory "
          f"{res['peak_extra_bytes'] / res['output_bytes']:.2f}x the dense output")
