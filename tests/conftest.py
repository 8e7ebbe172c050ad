"""Shared fixtures; hypothesis profiles chosen by $HYPOTHESIS_PROFILE (default, ci, expensive)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("expensive", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"


def quantized(shape: tuple[int, ...], density: float, k: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A random tensor with about ``density`` non-zeros drawn from ``k - 1`` shared values."""
    g = torch.Generator().manual_seed(seed)
    values = torch.linspace(-1, 1, max(k - 1, 1) + 1, dtype=torch.float64)
    values = values[values != 0][: max(k - 1, 1)].to(dtype)
    idx = torch.randint(0, values.numel(), shape, generator=g)
    mask = torch.rand(shape, generator=g) < density
    return torch.where(mask, values[idx], torch.zeros((), dtype=dtype))


def quantized_model(name: str, density: float = 0.1, k: int = 9, seed: int = 0) -> torch.nn.Module:
    """A built-in architecture whose conv/linear weights are replaced by ``quantized`` ones."""
    from swsformat.retrain.models import build_model, compressible_parameters

    model = build_model(name)
    with torch.no_grad():
        for i, (_, p) in enumerate(compressible_parameters(model)):
            p.copy_(quantized(tuple(p.shape), density, k, seed=seed + i))
    return model.eval()


def user_module(folder: Path, file: str, source: str) -> dict:
    """A user's module file (what ``--module file.py:Callable`` imports) written to ``folder``,
    and the namespace of the same source, to build the models in the test."""
    (folder / file).write_text(source)
    ns: dict = {}
    exec(source, ns)
    return ns


class TiedToCodebook(torch.nn.Module):
    """``lin.weight`` tied to a parameter called ``codebook`` (a name the selector skips)."""

    def __init__(self) -> None:
        super().__init__()
        self.codebook = torch.nn.Parameter(torch.randn(32, 16))
        self.lin = torch.nn.Linear(16, 32)
        self.lin.weight = self.codebook


@pytest.fixture(scope="session")
def mnist():
    """Real MNIST from $SWSFORMAT_DATA (CI points it at ../shared/data).

    Without the variable the tests skip; with it set, missing files are an error, so CI
    cannot pass by skipping.
    """
    from swsformat.retrain import data

    if not os.environ.get(data.ENV_VAR):
        pytest.skip(f"set ${data.ENV_VAR} to a folder holding mnist/ to run the MNIST tests")
    return data.load("mnist", download=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def small_mnist(mnist, monkeypatch, tmp_path):
    """Real MNIST cut to 3,000 training and 1,000 test images wherever the library loads it,
    and an empty pretrained cache."""
    from swsformat.retrain import data as data_mod

    train, test = mnist

    def load(name="mnist", root=None, download=True, normalization="unit"):
        full = data_mod.load.__wrapped__(name, root, download=False, normalization=normalization)
        return full[0].subset(3000), full[1].subset(1000)

    load.__wrapped__ = data_mod.load
    monkeypatch.setattr(data_mod, "load", load)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return train, test
