"""GPU inference from .sws files: correctness on CUDA, sparse vs dense kernels, file to first output.

One prepared run for a lent GPU (about 5-8 minutes on an H200), see ``benchmarks/gpu_run.sh``:

    python benchmarks/gpu_sparse.py --json results/gpu/h200.json --table results/gpu/h200.md

1. correctness: the committed LeNets and a 124M-weight model decoded to ``device="cuda"``
   dense and CSR, ``load_model(..., device="cuda", sparse=True/"auto")``, outputs against CPU;
2. kernels: ``y = x W^T`` for W of 4096x4096 and 16384x4096 at 90/95/99% unstructured
   sparsity, batch 1/16/64/256, fp16/bf16/fp32: cuBLAS dense, torch CSR (cuSPARSE), BSR
   (block 32; unstructured sparsity leaves most blocks non-empty) and 2:4 semi-structured
   (cuSPARSELt; the weights re-pruned to the 2:4 pattern, so it is a speed reference only);
   medians of CUDA-event timings;
3. file to first CUDA output, warm process: ``load_model(path, device="cuda")`` + forward vs
   safetensors ``load_file`` + ``load_state_dict`` + ``.to("cuda")`` + forward, and the same
   in a fresh process each (imports and numba's cache load included).

``--smoke`` runs every step at toy sizes on whatever device is present (CPU included), so
the script itself is tested in CI without a GPU. Each step records its own error instead of
stopping the run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import swsformat  # noqa: E402
from swsformat.provenance import provenance  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU, perf_counter elsewhere)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def quantize_(model: nn.Module, sparsity: float, levels: int = 15) -> nn.Module:
    """Per-layer magnitude pruning and uniform sharing of the survivors (fast enough for
    124M weights); the file then holds real codebooks and CSR streams."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                w = m.weight
                k = max(1, int(sparsity * w.numel()))
                thr = w.abs().flatten().kthvalue(k).values
                keep = w.abs() > thr
                lo, hi = float(w.min()), float(w.max())
                grid = torch.linspace(lo, hi, levels, dtype=w.dtype)
                snapped = grid[torch.bucketize(w, grid).clamp(max=levels - 1)]
                w.copy_(torch.where(keep & (snapped != 0), snapped, torch.zeros((), dtype=w.dtype)))
    return model


def gpt2_shaped(scale: int = 1) -> nn.Module:
    """Linear layers of GPT-2 small's shapes (124M weights at scale 1): what a load costs."""
    d, vocab, blocks = 768 // scale, 50257 // scale, 12 // scale or 1
    layers: list[nn.Module] = [nn.Linear(d, vocab, bias=False)]  # the tied embedding / lm head
    for _ in range(blocks):
        layers += [nn.Linear(d, 3 * d), nn.Linear(d, d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)]
    model = nn.ModuleList(layers)
    model.d = d
    return model


def gpt2_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = x
    for i in range(1, len(model), 4):
        qkv, proj, up, down = model[i : i + 4]
        h = h + proj(qkv(h)[..., : model.d])
        h = h + down(torch.relu(up(h)))
    return model[0](h)


# ----------------------------------------------------------------------------- 1. correctness


def correctness(device: str, smoke: bool, work: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    files = sorted((ROOT / "results" / "paper").glob("*.sws"))
    for path in files[:1] if smoke else files:
        x = torch.randn(64, 1, 28, 28)
        with torch.no_grad():
            ref = swsformat.load_model(path)(x)
            row = {}
            for mode in (False, True, "auto"):
                m = swsformat.load_model(path, device=device, sparse=mode)
                row[f"sparse={mode}"] = float((m(x.to(device)).cpu() - ref).abs().max())
            sd_dense = swsformat.load_state_dict(path, device=device)
            sd_csr = swsformat.load_state_dict(path, device=device, sparse=True)
            cpu = swsformat.load_state_dict(path)
            row["state_dict_bit_exact"] = all(torch.equal(sd_dense[k].cpu(), cpu[k]) for k in cpu)
            row["csr_bit_exact"] = all(
                torch.equal((v.to_dense() if v.layout == torch.sparse_csr else v).cpu().reshape(cpu[k].shape), cpu[k])
                for k, v in sd_csr.items()
            )
        out[path.name] = row
    big = quantize_(gpt2_shaped(8 if smoke else 1), 0.9)
    path = work / "gpt2-shaped.sws"
    t0 = time.perf_counter()
    swsformat.encode(big, path, compress=lambda n, t: t.dim() == 2)
    encode_s = time.perf_counter() - t0
    x = torch.randn(4, big.d)
    with torch.no_grad():
        ref = gpt2_forward(big, x)
        dense = swsformat.load_model(path, gpt2_shaped(8 if smoke else 1), device=device)
        got = gpt2_forward(dense, x.to(device)).cpu()
    out["gpt2-shaped"] = {
        "weights": sum(p.numel() for p in big.parameters()),
        "file_bytes": path.stat().st_size,
        "encode_s": round(encode_s, 2),
        "max_abs_diff_dense": float((got - ref).abs().max()),
    }
    return out


# -------------------------------------------------------------------------------- 2. kernels


def _weight(out_f: int, in_f: int, sparsity: float, dtype: torch.dtype, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    w *= torch.rand(out_f, in_f, generator=g) >= sparsity
    return w.to(dtype).to(device)


def _two_four(w: torch.Tensor) -> torch.Tensor:
    """Keep the two largest of every four along a row (the 2:4 pattern)."""
    groups = w.reshape(w.shape[0], -1, 4)
    idx = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return (groups * mask).reshape(w.shape)


def kernels(device: str, smoke: bool, repeat: int) -> list[dict[str, Any]]:
    shapes = [(256, 256)] if smoke else [(4096, 4096), (16384, 4096)]
    sparsities = [0.9] if smoke else [0.9, 0.95, 0.99]
    batches = [1, 16] if smoke else [1, 16, 64, 256]
    dtypes = [torch.float32] if device == "cpu" else [torch.float16, torch.bfloat16, torch.float32]
    rows = []
    for (out_f, in_f) in shapes:
        for sparsity in sparsities:
            for dtype in dtypes:
                w = _weight(out_f, in_f, sparsity, dtype, device)
                forms: dict[str, Any] = {"dense": w}
                for name, make in (
                    ("csr", lambda w: w.to_sparse_csr()),
                    ("bsr32", lambda w: w.to_sparse_bsr((32, 32))),
                    ("semi_2to4", lambda w: torch.sparse.to_sparse_semi_structured(_two_four(w))),
                ):
                    try:
                        forms[name] = make(w)
                    except Exception as exc:  # not every form exists for every dtype and device
                        forms[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
                for batch in batches:
                    x = torch.randn(batch, in_f, dtype=dtype, device=device)
                    row: dict[str, Any] = {"shape": f"{out_f}x{in_f}", "sparsity": sparsity, "dtype": str(dtype)[6:],
                                           "batch": batch}
                    for name, wf in forms.items():
                        if isinstance(wf, str):
                            row[f"{name}_s"] = None
                            row[f"{name}_error"] = wf
                            continue
                        if name == "semi_2to4":
                            fn = lambda wf=wf, x=x: torch.mm(wf, x.t())  # noqa: E731
                        elif name == "dense":
                            fn = lambda wf=wf, x=x: torch.nn.functional.linear(x, wf)  # noqa: E731
                        else:
                            fn = lambda wf=wf, x=x: torch.sparse.mm(wf, x.t())  # noqa: E731
                        try:
                            with torch.no_grad():
                                row[f"{name}_s"] = timed(fn, device, repeat)
                        except Exception as exc:
                            row[f"{name}_s"] = None
                            row[f"{name}_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
                    for name in ("csr", "bsr32", "semi_2to4"):
                        if row.get(f"{name}_s"):
                            row[f"{name}_speedup"] = row["dense_s"] / row[f"{name}_s"]
                    rows.append(row)
    return rows


# --------------------------------------------------------------------- 3. file to first output

FRESH = """
import sys, time
t0 = time.perf_counter()
import torch
sys.path.insert(0, {root!r})
import swsformat
kind, path = sys.argv[1], sys.argv[2]
x = torch.randn(1, 1, 28, 28)
if kind == "sws":
    m = swsformat.load_model(path, device={device!r})
else:
    from safetensors.torch import load_file
    from swsformat.retrain.models import build_model
    m = build_model({name!r})
    m.load_state_dict(load_file(path))
    m = m.to({device!r}).eval()
with torch.no_grad():
    y = m(x.to({device!r}))
    if {device!r}.startswith("cuda"):
        torch.cuda.synchronize()
print(time.perf_counter() - t0)
"""


def first_output(device: str, smoke: bool, work: Path, repeat: int) -> dict[str, Any]:
    from safetensors.torch import save_file

    from swsformat.retrain.models import build_model

    out: dict[str, Any] = {}
    files = sorted((ROOT / "results" / "paper").glob("*.sws"))
    for path in files[:1] if smoke else files:
        name = swsformat.read_header(path)["architecture"]["name"]
        st = work / f"{path.stem}.safetensors"
        save_file(swsformat.load_state_dict(path), str(st))
        x = torch.randn(1, 1, 28, 28)

        def sws_path(path=path, x=x):
            with torch.no_grad():
                swsformat.load_model(path, device=device)(x.to(device))
            _sync(device)

        def st_path(st=st, name=name, x=x):
            from safetensors.torch import load_file

            m = build_model(name)
            m.load_state_dict(load_file(str(st)))
            with torch.no_grad():
                m.to(device).eval()(x.to(device))
            _sync(device)

        row = {"sws_bytes": path.stat().st_size, "safetensors_bytes": st.stat().st_size}
        sws_t, st_t = [], []
        for _ in range(repeat):  # interleaved
            sws_t.append(timed(sws_path, "cpu", 1, warmup=1))
            st_t.append(timed(st_path, "cpu", 1, warmup=1))
        row["warm_sws_s"], row["warm_safetensors_s"] = statistics.median(sws_t), statistics.median(st_t)
        script = FRESH.format(root=str(ROOT), device=device, name=name)
        fresh = {"sws": [], "safetensors": []}
        for _ in range(1 if smoke else 3):
            for kind, p in (("sws", path), ("safetensors", st)):
                r = subprocess.run([sys.executable, "-c", script, kind, str(p)], capture_output=True, text=True, check=True)
                fresh[kind].append(float(r.stdout.strip().splitlines()[-1]))
        row["fresh_sws_s"] = statistics.median(fresh["sws"])
        row["fresh_safetensors_s"] = statistics.median(fresh["safetensors"])
        out[path.name] = row
    return out


# ------------------------------------------------------------------------------------- main


def _step(name: str, fn, results: dict[str, Any]) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn()
    except Exception:  # one broken step must not lose the others' numbers
        results[name] = {"error": traceback.format_exc()[-2000:]}
    results.setdefault("step_seconds", {})[name] = round(time.perf_counter() - t0, 1)
    print(f"{name}: {results['step_seconds'][name]} s", file=sys.stderr, flush=True)


def table(results: dict[str, Any]) -> str:
    lines = ["| shape | sparsity | dtype | batch | dense | CSR | BSR32 | 2:4 |", "|---|---|---|---|---|---|---|---|"]
    for r in results.get("kernels", []) if isinstance(results.get("kernels"), list) else []:
        def cell(name, r=r):
            s = r.get(f"{name}_s")
            if s is None:
                return "n/a"
            return f"{s * 1e6:.0f} us" + (f" ({r[name + '_speedup']:.2f}x)" if name != "dense" else "")
        lines.append(f"| {r['shape']} | {r['sparsity']:.0%} | {r['dtype']} | {r['batch']} | {cell('dense')} | "
                     f"{cell('csr')} | {cell('bsr32')} | {cell('semi_2to4')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="toy sizes: check the script, not the machine")
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--table", default=None)
    a = p.parse_args(argv)
    repeat = a.repeat or (3 if a.smoke else 50)
    results: dict[str, Any] = {
        "command": "python benchmarks/gpu_sparse.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if a.device.startswith("cuda") else platform.processor() or "cpu",
        "triton": _version("triton"),
        "smoke": a.smoke,
        "provenance": provenance(ROOT),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _step("correctness", lambda: correctness(a.device, a.smoke, work), results)
        _step("kernels", lambda: kernels(a.device, a.smoke, repeat), results)
        _step("first_output", lambda: first_output(a.device, a.smoke, work, 3 if a.smoke else 7), results)
    text = json.dumps(results, indent=1, default=str)
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(text + "\n")
    if a.table:
        Path(a.table).parent.mkdir(parents=True, exist_ok=True)
        Path(a.table).write_text(table(results))
    print(text if not a.json else table(results))
    failed = [k for k in ("correctness", "kernels", "first_output") if isinstance(results.get(k), dict) and "error" in results[k]]
    return 1 if failed else 0


def _version(name: str) -> str | None:
    try:
        return __import__(name).__version__
    except Exception:
        return None


if __name__ == "__main__":
    sys.exit(main())
