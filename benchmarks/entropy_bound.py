"""How close the coder and the generic compressors come to the order-0 entropy of quantized tensors.

For each coded tensor: the order-0 bound (every element an independent draw: a non-zero flag
at the tensor's density, and the non-zero's value at the empirical value frequencies), the
bytes of our context coder on it, and the best generic compressor on its uint8 CSR layout
(the layout ``generic_compressors.py`` finds best). On tensors with no structure (``--synthetic``:
Gaussian layers magnitude-pruned and k-means clustered, as a post-training user gets from
randomly initialised or structureless weights) the bound holds for *every* coder, so it says
how far below a generic compressor any format can go. On trained files the coder can beat the
bound: masks, densities and neighbours are structure that order 0 does not see.

    python benchmarks/entropy_bound.py --synthetic results/paper/*.sws --json benchmarks/entropy_bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import swsformat
from swsformat import ctxcoder, encoder
from swsformat.provenance import provenance
from swsformat.quantize import prune_and_cluster
from swsformat.spec import matrix_shape

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generic_compressors import compressors  # noqa: E402
from layouts import uint8_csr  # noqa: E402


def order0_bits(symbols: np.ndarray) -> float:
    """Bits of the flags and values of ``symbols`` coded as independent draws at their own frequencies."""
    n = symbols.size
    nz = symbols[symbols != 0]
    bits = 0.0
    if 0 < nz.size < n:
        p = nz.size / n
        bits += -n * (p * np.log2(p) + (1 - p) * np.log2(1 - p))
    if nz.size:
        q = np.bincount(nz).astype(np.float64)
        q = q[q > 0] / nz.size
        bits += -nz.size * float((q * np.log2(q)).sum())
    return bits


def measure(tensors: dict[str, torch.Tensor]) -> dict:
    """Totals over the coded tensors of ``tensors`` (those with at most 255 non-zero values)."""
    bound = coded = 0.0
    csr = []
    names = []
    for name, t in tensors.items():
        if not t.is_floating_point() or t.dim() < 1:
            continue
        try:
            _, codebook, symbols = encoder._symbols(name, t)
        except swsformat.SwsError:
            continue  # not quantized: stored raw, outside this comparison
        if not np.any(symbols):
            continue
        names.append(name)
        bound += order0_bits(symbols)
        coded += 8 * len(ctxcoder.encode_tensor(symbols, tuple(t.shape), ctxcoder.negative_symbols(codebook),
                                                ctxcoder.COUNTING))
        matrix = symbols.reshape(matrix_shape(tuple(t.shape)))
        r, c = np.nonzero(matrix)
        csr.append(uint8_csr(r, c, matrix[r, c], matrix.shape[0]))
    flat = b"".join(csr)
    generic = {k: len(fn(flat)) for k, fn in compressors().items()}
    best = min(generic, key=generic.get)
    return {
        "tensors": names,
        "order0_bound_bytes": round(bound / 8),
        "context_coder_bytes": round(coded / 8),
        "best_generic": f"uint8 CSR | {best}",
        "best_generic_bytes": generic[best],
        "coder_over_bound": coded / bound,
        "bound_over_best_generic": bound / 8 / generic[best],
        "coder_over_best_generic": coded / 8 / generic[best],
    }


def synthetic(density: float, clusters: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Four GPT-2-sized (2304 x 768) N(0, 0.02) layers pruned by magnitude to ``density`` and
    clustered to ``clusters`` values by the library's post-training path."""
    g = torch.Generator().manual_seed(seed)
    sd = {f"layer{i}.weight": torch.randn(2304, 768, generator=g) * 0.02 for i in range(4)}
    prune_and_cluster(sd, prune=1 - density, clusters=clusters, inplace=True)
    return sd


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="*", type=Path, help=".sws files")
    p.add_argument("--synthetic", action="store_true", help="also structureless layers at 5, 10 and 20%% density")
    p.add_argument("--json", type=Path, help="write the results here")
    a = p.parse_args(argv)
    results = []
    if a.synthetic:
        for density in (0.05, 0.1, 0.2):
            results.append({"source": f"synthetic 4 x 2304x768 N(0, 0.02), {density:.0%} kept, 16 values",
                            **measure(synthetic(density))})
    for path in a.files:
        results.append({"source": str(path), **measure(swsformat.load_state_dict(path))})
    for r in results:
        print(f"{r['source']}: bound {r['order0_bound_bytes']:,} B, coder {r['context_coder_bytes']:,} B "
              f"({r['coder_over_bound']:.3f}x bound), {r['best_generic']} {r['best_generic_bytes']:,} B "
              f"(bound/generic {r['bound_over_best_generic']:.3f}, coder/generic {r['coder_over_best_generic']:.3f})")
    if a.json:
        a.json.write_text(json.dumps({"command": "python " + " ".join(["benchmarks/entropy_bound.py", *(argv or sys.argv[1:])]),
                                      "provenance": provenance(), "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
