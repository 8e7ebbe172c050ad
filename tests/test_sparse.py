"""Sparse CSR inference gives the dense model's outputs."""

from __future__ import annotations

import pytest
import torch

import swsformat
from swsformat.retrain.models import MODELS

from .conftest import quantized_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sparse_model_matches_dense(name, device, tmp_path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = quantized_model(name)
    path = tmp_path / "m.sws"
    swsformat.encode(model, path)
    dense = swsformat.load_model(path, device=device)
    sparse = swsformat.load_model(path, device=device, sparse=True)
    assert any(b.layout == torch.sparse_csr for b in sparse.buffers())
    x = torch.randn(17, 1, 28, 28, device=device)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse(x[:1]), dense(x[:1]), rtol=1e-4, atol=1e-5)


def test_sparse_conv_with_padding_and_dilation():
    from swsformat.sparse import SparseConv2d

    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-5)
