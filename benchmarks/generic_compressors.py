"""Is a .sws file smaller than what a generic compressor makes of the same tensors?

For every file given, the decoded tensors are laid out flat in several ways a user might
try (the quantized tensors' own bytes; one uint8 symbol per weight plus the codebook; CSR
as uint8 gaps and uint8 symbols) and compressed with zstd -19 and --ultra -22, xz -9e,
brotli -q 11 and bzip2 -9 (those installed: ``pip install 'swsformat[bench]'``). The file is
compared with the best of all of them, and with itself re-encoded by this version's writer
(format 3, ``coder="auto"``, same tensors).

    python benchmarks/generic_compressors.py results/paper/*.sws results/*/*.sws
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
import sys
from pathlib import Path

import numpy as np
import torch

import swsformat
from swsformat.container import AliasTensor, RawTensor, SparseRawTensor
from swsformat.decoder import decode_csr_arrays
from swsformat.provenance import provenance
from swsformat.spec import matrix_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layouts import uint8_csr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def compressors() -> dict:
    out = {
        "xz -9e": lambda b: lzma.compress(b, preset=9 | lzma.PRESET_EXTREME),
        "bzip2 -9": lambda b: bz2.compress(b, 9),
    }
    try:
        import zstandard

        out["zstd -19"] = lambda b: zstandard.ZstdCompressor(level=19).compress(b)
        out["zstd --ultra -22"] = lambda b: zstandard.ZstdCompressor(level=22).compress(b)
    except ImportError:
        pass
    try:
        import brotli

        out["brotli -q 11"] = lambda b: brotli.compress(b, quality=11, lgwin=24)
    except ImportError:
        pass
    return out


def layouts(path: Path) -> dict[str, bytes]:
    """Flat byte layouts of the file's tensors (ties once), as a user might write them."""
    f = swsformat.open(path, max_output_bytes=1 << 40)
    own, symbols, csr = [], [], []
    for name in f.keys():
        t = f.tensor(name)
        if isinstance(t, AliasTensor):
            continue
        if isinstance(t, RawTensor | SparseRawTensor):  # a user would write the dense bytes
            dense = f.get_tensor(name).contiguous().view(-1)
            raw = (dense.view(torch.int16) if dense.dtype == torch.bfloat16 else dense).numpy().tobytes()
            for parts in (own, symbols, csr):
                parts.append(raw)
            continue
        dense = f.get_tensor(name).contiguous().view(-1)
        own.append((dense.view(torch.int16) if dense.dtype == torch.bfloat16 else dense).numpy().tobytes())
        rows, cols = matrix_shape(t.shape)
        crow, col, vals = decode_csr_arrays(t)
        sym = np.searchsorted(t.codebook, vals).astype(np.uint8) + 1
        full = np.zeros(rows * cols, np.uint8)
        r = np.repeat(np.arange(rows), np.diff(crow))
        full[r * cols + col] = sym
        symbols.append(t.codebook.tobytes() + full.tobytes())
        csr.append(t.codebook.tobytes() + uint8_csr(r, col, sym, rows))
    return {"tensors' own bytes": b"".join(own), "uint8 symbols": b"".join(symbols), "uint8 CSR": b"".join(csr)}


def measure(path: Path) -> dict:
    sd = swsformat.load_state_dict(path, max_output_bytes=1 << 40)
    f = swsformat.open(path)
    coded = {k for k in f.keys() if f.entry(k).kind == "sws"}
    v3 = swsformat.encode_bytes(sd, compress=coded, metadata=f.metadata(), architecture=f.architecture)
    best = None
    sizes = {}
    for lname, raw in layouts(path).items():
        for cname, fn in compressors().items():
            n = len(fn(raw))
            sizes[f"{lname} | {cname}"] = n
            if best is None or n < best[1]:
                best = (f"{lname} | {cname}", n)
    size = path.stat().st_size
    return {
        "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "format_version": f.version,
        "file_bytes": size,
        "v3_auto_bytes": len(v3),
        "best_generic": best[0],
        "best_generic_bytes": best[1],
        "ratio_file": size / best[1],
        "ratio_v3": len(v3) / best[1],
        "all": sizes,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    rows = []
    for path in a.files:
        r = measure(path.resolve())
        rows.append(r)
        print(f"{r['file']}: {r['file_bytes']} B (v{r['format_version']}), format 3 auto {r['v3_auto_bytes']} B; "
              f"best generic {r['best_generic_bytes']} B ({r['best_generic']}): "
              f"{r['ratio_file']:.2f}x / {r['ratio_v3']:.2f}x of it")
    if a.json:
        a.json.write_text(json.dumps({"command": "python benchmarks/generic_compressors.py " + " ".join(sys.argv[1:]),
                                      "provenance": provenance(ROOT), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
