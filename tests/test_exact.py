"""Exact pruning: what cannot change the output is zeroed, and the output stays bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import swsformat
from swsformat.errors import SwsError
from swsformat.exact import remove_dead_units_, remove_dead_units_verified_
from swsformat.retrain.models import build_model

from .conftest import quantized_model


def plant_dead_units(model: nn.Module) -> None:
    """fc1 unit 0: no inputs, negative bias (ReLU -> 0); fc1 unit 1: no inputs, positive bias
    (a constant, must stay); fc1 unit 2: nothing reads it (its fc2 column is zero)."""
    with torch.no_grad():
        model.fc1.weight[0:2] = 0
        model.fc1.bias[0] = -0.5
        model.fc1.bias[1] = 0.5
        model.fc2.weight[:, 2] = 0


def test_lenet300_dead_units_are_removed_and_outputs_stay_bit_identical():
    model = quantized_model("lenet300-100", density=0.3)
    plant_dead_units(model)
    x = torch.randn(64, 1, 28, 28)
    before = model(x)
    out_of_2 = int((model.fc1.weight[2] != 0).sum())
    removed = remove_dead_units_(model, x[:1])
    assert torch.equal(model(x), before)
    assert (model.fc2.weight[:, 0] == 0).all() and model.fc1.bias[0] == 0  # behind the ReLU
    assert (model.fc2.weight[:, 1] != 0).any() and model.fc1.bias[1] == 0.5  # a constant input stays
    assert (model.fc1.weight[2] == 0).all() and model.fc1.bias[2] == 0  # feeds nothing
    assert removed["fc1"] >= out_of_2 + 2


def test_lenet5_filters_that_feed_nothing_and_flattened_blocks():
    """LeNet-5-Caffe has no ReLU after its convs: a filter with no inputs outputs its bias,
    so only filters that feed nothing go; the flatten maps a filter to 16 fc1 columns."""
    model = quantized_model("lenet5-caffe", density=0.3)
    with torch.no_grad():
        model.fc1.weight.view(500, 50, 16)[:, 7] = 0  # conv2 filter 7 feeds nothing
        model.conv2.weight[3] = 0  # filter 3 has no inputs but a bias: a constant, stays read
    x = torch.randn(16, 1, 28, 28)
    before = model(x)
    removed = remove_dead_units_(model, x[:1])
    assert torch.equal(model(x), before)
    assert (model.conv2.weight[7] == 0).all() and model.conv2.bias[7] == 0
    assert (model.fc1.weight.view(500, 50, 16)[:, 3] != 0).any()
    assert removed["conv2"] > 0


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.a(x))
        return self.b(h) + h  # a's units are read by the add too: no link a -> b


def test_units_read_elsewhere_are_left_alone():
    m = Residual()
    with torch.no_grad():
        m.b.weight[:, 0] = 0
    w = m.a.weight.clone()
    assert remove_dead_units_(m, torch.randn(2, 8)) == {}
    assert torch.equal(m.a.weight, w)


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow
            return self.fc(x)
        return x


def test_untraceable_models_get_a_clear_error_and_stay_unchanged():
    m = Untraceable()
    w = m.fc.weight.clone()
    with pytest.raises(SwsError, match="torch.fx"):
        remove_dead_units_verified_(m, [torch.randn(2, 4)])
    assert torch.equal(m.fc.weight, w)
    with pytest.raises(SwsError, match="at least one input batch"):
        remove_dead_units_verified_(m, [])


def test_removing_dead_units_makes_the_file_smaller(tmp_path):
    model = quantized_model("lenet300-100", density=0.2)
    with torch.no_grad():
        model.fc1.weight[:100] = 0
        model.fc1.bias[:100] = -1.0
    before = len(swsformat.encode_bytes(model))
    swsformat.remove_dead_units_(model, torch.zeros(1, 1, 28, 28))
    assert len(swsformat.encode_bytes(model)) < before - 500


def test_built_in_architectures_are_traced():
    from swsformat.exact import _links

    for name, n in (("lenet300-100", 2), ("lenet5-caffe", 3), ("tutorial-net", 3)):
        assert len(_links(build_model(name), torch.zeros(1, 1, 28, 28))) == n
