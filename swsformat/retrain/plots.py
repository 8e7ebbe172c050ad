"""Pictures from a run: weight histograms, the learned mixture, the weight-movement GIF.

matplotlib (and pillow for the GIF) are optional: ``pip install 'swsformat[plots]'``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .models import compressible_parameters
from .prior import Mixture, MixturePrior


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the extra
        raise ImportError("plots need matplotlib: pip install 'swsformat[plots]'") from exc
    return plt


def flat_weights(model: nn.Module) -> np.ndarray:
    return torch.cat([p.detach().flatten().cpu() for _, p in compressible_parameters(model)]).numpy()


def histograms(stages: dict[str, np.ndarray], path: str | Path, bins: int = 200) -> None:
    """One column per stage (e.g. pretrained / retrained / quantized), linear and log counts."""
    plt = _plt()
    fig, axes = plt.subplots(2, len(stages), figsize=(4 * len(stages), 6), squeeze=False)
    lim = max(float(np.abs(w).max()) for w in stages.values()) or 1.0
    for col, (name, w) in enumerate(stages.items()):
        for row, log in enumerate((False, True)):
            ax = axes[row][col]
            ax.hist(w, bins=bins, range=(-lim, lim), log=log, color="tab:blue")
            ax.set_title(f"{name}{' (log)' if log else ''}: {100 * np.mean(w != 0):.2f}% non-zero")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def mixture_plot(weights: np.ndarray, mix: Mixture, path: str | Path) -> None:
    """The learned mixture density over a log-scaled weight histogram."""
    plt = _plt()
    lim = float(np.abs(weights).max()) or 1.0
    x = np.linspace(-lim, lim, 2000)
    fig, ax = plt.subplots(figsize=(8, 4))
    density, _, _ = ax.hist(weights, bins=300, range=(-lim, lim), density=True, log=True, alpha=0.5, label="weights")
    for m, s, p in zip(mix.means, mix.stds, mix.pi):
        ax.plot(x, p * np.exp(-0.5 * ((x - m) / s) ** 2) / (s * np.sqrt(2 * np.pi)), lw=1)
    # Up to a decade above the histogram: a collapsed component's peak would stretch the axis.
    ax.set_ylim(1e-2, 10 * max(float(np.max(density)), 1.0))
    ax.set_title(f"learned mixture: {len(mix.means)} components")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class MovementRecorder:
    """``on_epoch`` callback that records a fixed sample of weights and the mixture each epoch."""

    def __init__(self, model: nn.Module, sample: int = 20000, seed: int = 0) -> None:
        w = flat_weights(model)
        rng = np.random.default_rng(seed)
        self.idx = rng.choice(w.size, min(sample, w.size), replace=False)
        self.start = w[self.idx]
        self.frames: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = []

    def __call__(self, epoch: int, model: nn.Module, prior: MixturePrior) -> None:
        self.frames.append((epoch, flat_weights(model)[self.idx], prior.snapshot()))

    def gif(self, path: str | Path, fps: int = 2) -> None:
        """Pretrained value (x) against current value (y), mixture means +- 2 std as bands."""
        plt = _plt()
        from PIL import Image

        lim = float(np.abs(self.start).max()) or 1.0
        images = []
        for epoch, w, mix in self.frames:
            fig, ax = plt.subplots(figsize=(5, 5))
            for m, s in zip(mix["means"], mix["stds"]):
                ax.axhspan(m - 2 * s, m + 2 * s, color="tab:orange", alpha=0.2)
            ax.scatter(self.start, w, s=1, alpha=0.3)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_xlabel("pretrained weight")
            ax.set_ylabel("current weight")
            ax.set_title(f"epoch {epoch}")
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=70)
            plt.close(fig)
            buf.seek(0)
            images.append(Image.open(buf).convert("P"))
        if images:
            images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
