"""``sws plot``: pictures of a ``.sws`` file (needs ``pip install 'swsformat[plots]'``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .container import ContextTensor, SwsTensor
from .decoder import codebook_values, value_counts
from .reader import PathLike, read_container


def _scaled(values: np.ndarray) -> tuple[np.ndarray, str]:
    """Values and an axis label; values so large that their span overflows are scaled."""
    top = float(np.abs(values).max()) if values.size else 0.0
    if np.isfinite(top * 2) and top < 1e300:
        return values, "weight value"
    return values / top, f"weight value / {top:.3g}"


def plot_file(path: PathLike, prefix: str | None = None, max_output_bytes: int | None = None) -> list[Path]:
    """Write ``PREFIX-histogram.png`` (how many weights take each shared value, log counts)
    and ``PREFIX-codebook.png`` (the shared values of each layer). Both come from the
    codebooks and value streams: no tensor is decoded dense."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError("plots need matplotlib: pip install 'swsformat[plots]'") from exc
    c = read_container(path, max_output_bytes)
    prefix = prefix or str(Path(path).with_suffix(""))
    coded = [t for t in c.tensors if isinstance(t, SwsTensor | ContextTensor)]
    books = [codebook_values(t) for t in coded]
    everything = np.concatenate(books) if books else np.zeros(0)
    _, label = _scaled(everything)
    scale = float(np.abs(everything).max()) if label != "weight value" else 1.0
    fig, ax = plt.subplots(figsize=(8, 4))
    for t, values in zip(coded, books):
        counts = value_counts(t)
        numel = int(np.prod(t.shape))
        ax.vlines(values / scale, 0.8, np.maximum(counts, 1), alpha=0.7, label=f"{t.name} ({t.nonzeros} non-zero of {numel})")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("weights")
    ax.set_title("weights per shared value, per layer (zeros omitted)")
    if coded:
        ax.legend(fontsize=7)
    fig.tight_layout()
    hist = Path(f"{prefix}-histogram.png")
    fig.savefig(hist, dpi=100)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * max(len(coded), 1)))
    for i, values in enumerate(books):
        ax.scatter(values / scale, np.full(values.size, i), marker="|", s=200)
    ax.set_yticks(range(len(coded)), [t.name for t in coded])
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel(label.replace("weight value", "shared value"))
    ax.set_title("codebook of each layer (zero implicit)")
    fig.tight_layout()
    book = Path(f"{prefix}-codebook.png")
    fig.savefig(book, dpi=100)
    plt.close(fig)
    return [hist, book]
