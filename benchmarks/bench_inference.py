"""Inference latency, dense vs sparse CSR weights, batch 1 and 256, CPU and (when present) CUDA."""

from __future__ import annotations

import pytest
import torch

from swsformat.sparse import SparseLinear

from .conftest import best_of, record

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def layer(sparsity: float, n: int = 4096, device: str = "cpu") -> tuple[torch.nn.Linear, SparseLinear]:
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(n, n)
    with torch.no_grad():
        lin.weight.mul_((torch.rand(n, n, generator=g) >= sparsity).float())
    lin = lin.to(device)
    return lin, SparseLinear(lin).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch", [1, 256])
@pytest.mark.parametrize("sparsity", [0.9, 0.99])
def test_linear_4096_dense_vs_sparse(benchmark, device, batch, sparsity):
    dense, sparse = layer(sparsity, device=device)
    x = torch.randn(batch, 4096, device=device)
    sync = device == "cuda"

    def run_sparse():
        with torch.no_grad():
            sparse(x)
        if sync:
            torch.cuda.synchronize()

    def run_dense():
        with torch.no_grad():
            dense(x)
        if sync:
            torch.cuda.synchronize()

    benchmark(run_sparse)
    baseline = best_of(run_dense, repeat=20)
    record(benchmark, f"4096x4096 {sparsity:.0%} sparse, batch {batch}, {device}", benchmark.stats.stats.min, baseline, "dense")
