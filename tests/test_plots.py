"""Figures from a run."""

from __future__ import annotations

import numpy as np
import pytest

from swsformat.retrain import plots
from swsformat.retrain.prior import Mixture

pytest.importorskip("matplotlib")


def test_mixture_plot_axis_follows_the_histogram(tmp_path, monkeypatch):
    """A narrow component's peak (here 1e3 above the weights' histogram) must not stretch the
    log axis: it used to reach 1e18 and squash the histogram to the bottom of the figure."""
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.normal(0, 0.003, 60000), rng.normal(0.1, 0.006, 1000)])
    mix = Mixture(np.array([0.0, 0.1, 0.2]), np.array([0.003, 0.006, 1e-9]), np.array([0.98, 0.019, 0.001]))
    plt = plots._plt()
    limits = []
    close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig: (limits.append(fig.axes[0].get_ylim()), close(fig)))
    plots.mixture_plot(w, mix, tmp_path / "mixture.png")
    density_max = np.histogram(w, bins=300, range=(-np.abs(w).max(), np.abs(w).max()), density=True)[0].max()
    assert (tmp_path / "mixture.png").stat().st_size > 0
    assert limits[0][1] == pytest.approx(10 * density_max)


def test_file_plots_come_from_codebooks_and_value_counts(tmp_path):
    """bfloat16 values read as bfloat16, huge float64 values scaled, counts as in the tensor."""
    import torch

    import swsformat
    from swsformat.decoder import codebook_values, value_counts
    from swsformat.plotting import plot_file

    sd = {
        "b.weight": torch.tensor([[1.0, 0.0, -3e38], [1.0, 1.0, 0.0]], dtype=torch.bfloat16),
        "d.weight": torch.tensor([[1.7e308, 0.0, -1.7e308]], dtype=torch.float64),
        "z.weight": torch.zeros(3, 3),
    }
    path = tmp_path / "odd.sws"
    swsformat.encode(sd, path, smallest=False)
    c = swsformat.open(path).container()
    for t in c.tensors:
        dense = sd[t.name].double().flatten()
        got = dict(zip(codebook_values(t).tolist(), value_counts(t).tolist()))
        want = {v: int((dense == v).sum()) for v in dense[dense != 0].unique().tolist()}
        assert got == want, t.name
    written = plot_file(path, str(tmp_path / "p"))
    assert all(p.stat().st_size > 1000 for p in written)
