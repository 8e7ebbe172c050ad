"""File to ready state_dict / first inference: .sws against torch.load of the fp32 state_dict."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import torch

import swsformat
from swsformat.retrain.models import build_model, compressible_parameters

from .conftest import best_of, record

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "results" / "paper" / "lenet5-caffe.sws"


def _files(tmp_path: Path) -> tuple[Path, Path, torch.nn.Module]:
    """The committed LeNet-5-Caffe file if present, else a synthetic 1%-dense quantized one."""
    if COMMITTED.exists():
        sws = COMMITTED
        model = swsformat.load_model(sws)
    else:
        model = build_model("lenet5-caffe")
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in compressible_parameters(model):
                means = torch.linspace(-0.2, 0.2, 15)
                p.copy_(torch.where(torch.rand(p.shape, generator=g) < 0.01, means[torch.randint(0, 15, p.shape, generator=g)], torch.zeros(())))
        sws = tmp_path / "lenet5.sws"
        swsformat.encode(model, sws)
    pt = tmp_path / "lenet5.pt"
    torch.save(model.state_dict(), pt)
    return sws, pt, model


def test_load_state_dict_vs_torch_load(benchmark, tmp_path):
    sws, pt, _ = _files(tmp_path)
    swsformat.load_state_dict(sws)  # numba compiled (or loaded from cache) outside the timing
    benchmark(swsformat.load_state_dict, sws)
    baseline = best_of(lambda: torch.load(pt, weights_only=True), repeat=20)
    record(benchmark, "LeNet-5-Caffe file -> state_dict", benchmark.stats.stats.min, baseline, "torch_load")
    benchmark.extra_info["sws_bytes"] = sws.stat().st_size
    benchmark.extra_info["pt_bytes"] = pt.stat().st_size


def test_load_to_first_inference(benchmark, tmp_path):
    sws, pt, _ = _files(tmp_path)
    x = torch.randn(1, 1, 28, 28)

    def ours():
        return swsformat.load_model(sws)(x)

    def baseline_fn():
        m = build_model("lenet5-caffe")
        m.load_state_dict(torch.load(pt, weights_only=True))
        return m.eval()(x)

    ours()
    benchmark(ours)
    baseline = best_of(baseline_fn, repeat=20)
    record(benchmark, "LeNet-5-Caffe file -> first inference", benchmark.stats.stats.min, baseline, "torch_load_path")


def test_first_call_cost_in_a_fresh_process(benchmark, tmp_path):
    """Import + first decode in a new interpreter: numba's on-disk cache makes this cheap after the first run."""
    sws, _, _ = _files(tmp_path)
    code = (
        "import time; t0 = time.perf_counter(); import swsformat; t1 = time.perf_counter(); "
        f"swsformat.load_state_dict({str(sws)!r}); t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)  # warm the cache
    out = benchmark.pedantic(
        lambda: subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout,
        rounds=3,
        iterations=1,
    )
    imp, first = map(float, out.split())
    benchmark.extra_info.update(import_s=imp, first_load_s=first)


def test_size_against_generic_compressors(benchmark, tmp_path):
    """File size: .sws against torch.save fp32, its gzip and lzma, and the quantized dict under lzma."""
    import gzip
    import lzma

    sws, pt, model = _files(tmp_path)
    rep = benchmark(swsformat.size_report, sws)
    raw = pt.read_bytes()
    buf = io.BytesIO()
    torch.save({k: v.clone() for k, v in model.state_dict().items()}, buf)
    sizes = {
        "torch_save_fp32": len(raw),
        "gzip9": len(gzip.compress(raw, 9)),
        "lzma": len(lzma.compress(raw, preset=9)),
        "sws": rep["file_bytes"],
    }
    benchmark.extra_info.update(sizes)
    for k in ("torch_save_fp32", "gzip9", "lzma"):
        benchmark.extra_info[f"sws_smaller_than_{k}"] = sizes[k] / sizes["sws"]
    benchmark.extra_info["compression_rate"] = rep["compression_rate"]
    benchmark.extra_info["paper_compression_rate"] = rep["paper_compression_rate"]
    assert sizes["sws"] < sizes["lzma"]
