"""``sws plot``: pictures of a ``.sws`` file (needs ``pip install 'swsformat[plots]'``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .container import SwsTensor
from .decoder import decode_dense_array
from .reader import PathLike, read_container


def plot_file(path: PathLike, prefix: str | None = None, max_output_bytes: int | None = None) -> list[Path]:
    """Write ``PREFIX-histogram.png`` (non-zero weights, log counts) and ``PREFIX-codebook.png``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'swsformat[plots]'") from exc
    c = read_container(path, max_output_bytes)
    prefix = prefix or str(Path(path).with_suffix(""))
    coded = [t for t in c.tensors if isinstance(t, SwsTensor)]
    fig, ax = plt.subplots(figsize=(8, 4))
    for t in coded:
        w = decode_dense_array(t).view(t.codebook.dtype.str.replace("u", "f")).astype(np.float64).ravel()
        nz = w[w != 0]
        ax.hist(nz, bins=200, log=True, alpha=0.6, label=f"{t.name} ({nz.size} non-zero of {w.size})")
    ax.set_xlabel("weight value")
    ax.set_title("non-zero weights per layer (zeros omitted)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    hist = Path(f"{prefix}-histogram.png")
    fig.savefig(hist, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * max(len(coded), 1)))
    for i, t in enumerate(coded):
        values = t.codebook.view(t.codebook.dtype.str.replace("u", "f")).astype(np.float64)
        ax.scatter(values, np.full(values.size, i), marker="|", s=200)
    ax.set_yticks(range(len(coded)), [t.name for t in coded])
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("shared value")
    ax.set_title("codebook of each layer (zero implicit)")
    fig.tight_layout()
    book = Path(f"{prefix}-codebook.png")
    fig.savefig(book, dpi=100)
    plt.close(fig)
    return [hist, book]
