"""Post-training encode of real architectures: sizes against safetensors and generic
compressors of the same quantized tensors, encode and load times against torch.

Models are built from their published configs with random initialisation (no downloads):
GPT-2 small (tied embeddings) and BERT-base from ``transformers`` (``pip install
transformers``), and an embedding + 2-layer LSTM language model. Each is pruned by magnitude
over the whole model and clustered to 16 shared values (``prune_and_cluster``), then written
as .sws (format 3, default coder), as safetensors, and as its raw quantized bytes and as
uint8 CSR (gaps, symbols) under zstd -19, xz -6 and brotli (those installed).

    python benchmarks/real_models.py --json benchmarks/real_models.json
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numba
import numpy as np
import torch
from torch import nn

import swsformat
from swsformat.provenance import provenance
from swsformat.quantize import prune_and_cluster
from swsformat.selection import default_selector

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import touch, uint8_csr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class LSTMLM(nn.Module):
    def __init__(self, vocab: int = 10000, dim: int = 650) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=2, batch_first=True)
        self.out = nn.Linear(dim, vocab)


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "lstm-lm":
        return LSTMLM()
    import transformers

    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config())
    if name == "bert-base":
        return transformers.BertForMaskedLM(transformers.BertConfig())
    raise ValueError(name)


def csr_u8(sd: dict[str, torch.Tensor], coded: set[str]) -> bytes:
    """Coded tensors as (codebook, uint32 row counts, uint8 gaps with 255-fillers, uint8 symbols);
    the others as their bytes. Vectorised: no Python loop per weight."""
    parts = []
    seen: set[int] = set()
    for name, t in sd.items():
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        a = t.detach().contiguous().view(t.shape[0] if t.dim() else 1, -1)
        if name not in coded:
            parts.append((a.view(torch.int16) if a.dtype == torch.bfloat16 else a).numpy().tobytes())
            continue
        flat = a.numpy()
        rows, cols = np.nonzero(flat)
        book, sym = np.unique(flat[rows, cols], return_inverse=True)
        parts.append(book.tobytes() + uint8_csr(rows, cols, sym + 1, flat.shape[0]))
    return b"".join(parts)


def generic(raw: bytes, fast: bool) -> dict[str, int]:
    out = {"xz -6": len(lzma.compress(raw, preset=6))}
    try:
        import zstandard

        out["zstd -19"] = len(zstandard.ZstdCompressor(level=19, threads=0).compress(raw))
    except ImportError:
        pass
    try:
        import brotli

        out["brotli -q 9" if fast else "brotli -q 11"] = len(brotli.compress(raw, quality=9 if fast else 11))
    except ImportError:
        pass
    return out


def median_times(fns: list, repeat: int) -> list[float]:
    """Median seconds of each of ``fns``, run interleaved (one of each per round) so that a
    noisy machine slows them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return [statistics.median(ts) for ts in times]


_RSS = """
def _rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
"""


def peak_rss(code: str) -> int:
    """Peak resident bytes that ``code`` adds in a fresh Python process, above what it holds
    after importing torch and swsformat (Linux: the peak is reset through /proc/self/clear_refs)."""
    head = (_RSS + "import torch, swsformat, swsformat.cli, swsformat.quantize\n"
            "open('/proc/self/clear_refs', 'w').write('5')\nbase = _rss('VmRSS:')\n")
    tail = "\nprint('PEAK', _rss('VmHWM:') - base)"
    out = subprocess.run([sys.executable, "-c", head + code + tail], check=True, capture_output=True, text=True).stdout
    return int(out.rsplit("PEAK", 1)[1])


def _cli_encode_peak(path: Path, prune: float, clusters: int, out: Path) -> int:
    return peak_rss("from swsformat.cli import main\n"
                    f"assert main(['encode', {str(path)!r}, '-o', {str(out)!r}, '--prune', '{prune}', "
                    f"'--clusters', '{clusters}']) in (0, None)")


def memory(path: Path, prune: float, clusters: int, out: Path) -> dict:
    """Peak memory that ``sws encode --prune --clusters`` on a checkpoint adds to a fresh process,
    against what loading it (``torch.load``) adds; and the same encode of a 16 KB checkpoint:
    the fixed cost, mostly numba's code generator (~65 MB, taken by the first compiled kernel
    a process runs, even a trivial cached one)."""
    load = peak_rss(f"sd = torch.load({str(path)!r}, weights_only=True)")
    cli = _cli_encode_peak(path, prune, clusters, out)
    tiny = out.with_name("tiny.pt")
    torch.save({"fc.weight": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}, tiny)
    fixed = _cli_encode_peak(tiny, prune, clusters, out.with_name("tiny.sws"))
    return {"torch_load_peak_bytes": load, "cli_encode_peak_bytes": cli, "cli_encode_fixed_peak_bytes": fixed}


def measure(name: str, prune: float, clusters: int, repeat: int, folder: Path, previous: dict | None = None) -> dict:
    from safetensors.torch import save_model

    model = build(name).eval()
    sd = model.state_dict()
    t = time.perf_counter()
    q = prune_and_cluster(sd, prune=prune, clusters=clusters)
    cluster_s = time.perf_counter() - t
    coded = {k for k in q if default_selector(k, q[k])}
    paths = {k: folder / f"{name}.{k}" for k in ("sws", "pt", "safetensors")}
    encode_s, save_s, both_s = median_times([
        lambda: swsformat.encode(q, paths["sws"]),
        lambda: torch.save(q, paths["pt"]),
        lambda: swsformat.encode(prune_and_cluster(sd, prune=prune, clusters=clusters), paths["sws"]),
    ], repeat)
    model.load_state_dict(q)
    save_model(model, str(paths["safetensors"]))  # ties once, as transformers does
    load_s, torch_load_s = median_times([
        lambda: touch(swsformat.load_state_dict(paths["sws"], max_output_bytes=1 << 40)),
        lambda: touch(torch.load(paths["pt"])),
    ], repeat)
    seen: set[int] = set()
    own = []
    for t_ in q.values():
        if t_.data_ptr() not in seen:
            seen.add(t_.data_ptr())
            own.append((t_.view(torch.int16) if t_.dtype == torch.bfloat16 else t_).contiguous().numpy().tobytes())
    if previous is not None:  # --timing-only: sizes of generic compressors from the earlier run
        sizes = previous["generic"]
    else:
        sizes = {f"own bytes | {k}": v for k, v in generic(b"".join(own), fast=True).items()}
        sizes.update({f"uint8 CSR | {k}": v for k, v in generic(csr_u8(q, coded), fast=False).items()})
    best = min(sizes, key=sizes.get)
    rep = swsformat.size_report(paths["sws"], entropy=False, max_output_bytes=1 << 40)
    f = swsformat.open(paths["sws"])
    return {
        "model": name,
        "weights": sum(p.numel() for p in model.parameters()),
        "prune": prune,
        "clusters": clusters,
        "nonzero_fraction": rep["nonzero_fraction"],
        "aliases": [k for k in f.keys() if f.entry(k).kind == "alias"],
        "coders": {c: sum(1 for k in f.keys() if f.entry(k).kind == "sws" and f.entry(k).coder == c)
                   for c in ("context", "huffman")},
        "sws_bytes": paths["sws"].stat().st_size,
        "safetensors_bytes": paths["safetensors"].stat().st_size,
        "torch_save_bytes": paths["pt"].stat().st_size,
        "generic": sizes,
        "best_generic": best,
        "sws_over_best_generic": paths["sws"].stat().st_size / sizes[best],
        "sws_over_best_generic_own_bytes": paths["sws"].stat().st_size
        / min(v for k, v in sizes.items() if k.startswith("own bytes")),
        "prune_and_cluster_s": cluster_s,
        "encode_s": encode_s,
        "torch_save_s": save_s,
        "encode_over_torch_save": encode_s / save_s,
        "prune_cluster_encode_s": both_s,
        "prune_cluster_encode_over_torch_save": both_s / save_s,
        "load_s": load_s,
        "torch_load_s": torch_load_s,
        "load_over_torch_load": load_s / torch_load_s,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["lstm-lm", "gpt2", "bert-base"])
    p.add_argument("--prune", type=float, default=0.9)
    p.add_argument("--clusters", type=int, default=16)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--timing-only", action="store_true",
                   help="take the generic compressors' sizes from an earlier run's JSON (--sizes-from, default --json)")
    p.add_argument("--sizes-from", type=Path, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch and numba threads (default: as started)")
    p.add_argument("--memory", action="store_true",
                   help="also measure peak memory of `sws encode --prune --clusters` on each model's checkpoint "
                        "against torch.load of it (fresh processes)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
        numba.set_num_threads(a.threads)
    earlier = {}
    if a.timing_only:
        earlier = {r["model"]: r for r in json.loads((a.sizes_from or a.json).read_text())["results"]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.models:
            r = measure(name, a.prune, a.clusters, a.repeat, Path(tmp), earlier.get(name))
            if a.memory:
                ckpt = Path(tmp) / f"{name}.checkpoint.pt"
                torch.save(build(name).state_dict(), ckpt)
                r.update(memory(ckpt, a.prune, a.clusters, Path(tmp) / f"{name}.cli.sws"))
                r["checkpoint_bytes"] = ckpt.stat().st_size
                print(f"  peak memory: sws encode {r['cli_encode_peak_bytes'] / 2**20:.0f} MiB (of which fixed "
                      f"{r['cli_encode_fixed_peak_bytes'] / 2**20:.0f} MiB), torch.load "
                      f"{r['torch_load_peak_bytes'] / 2**20:.0f} MiB, checkpoint {r['checkpoint_bytes'] / 2**20:.0f} MiB")
            rows.append(r)
            print(f"{name}: {r['sws_bytes']:,} B .sws, safetensors {r['safetensors_bytes']:,} B "
                  f"({r['safetensors_bytes'] / r['sws_bytes']:.1f}x), best generic {r['generic'][r['best_generic']]:,} B "
                  f"({r['best_generic']}; .sws is {r['sws_over_best_generic']:.2f}x of it, "
                  f"{r['sws_over_best_generic_own_bytes']:.2f}x of the best on the tensors' own bytes); "
                  f"encode {r['encode_over_torch_save']:.2f}x torch.save "
                  f"({r['prune_cluster_encode_over_torch_save']:.2f}x with prune_and_cluster), load {r['load_over_torch_load']:.2f}x torch.load; "
                  f"aliases {r['aliases']}")
            for f in Path(tmp).iterdir():
                os.unlink(f)
    if a.json:
        a.json.write_text(json.dumps({"command": "python benchmarks/real_models.py " + " ".join(sys.argv[1:]),
                                      "threads": torch.get_num_threads(), "provenance": provenance(ROOT),
                                      "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
