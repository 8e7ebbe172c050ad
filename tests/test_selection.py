"""Which tensors are weights: by layer type for a module, by name and shape for a state_dict."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import swsformat
from swsformat import selection
from swsformat.cli import main
from swsformat.errors import SwsEncodeError
from swsformat.quantize import prune_and_cluster

from .conftest import user_module


class Conv1D(nn.Module):
    """Stands in for transformers' GPT-2 Conv1D, which is matched by class name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class Odd(nn.Module):
    """Weights of every covered layer kind next to 2-D tensors that are not weights."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(16, 16))  # a custom module's own parameter
        self.norm = nn.LayerNorm([4, 8])  # a 2-D norm weight
        self.fc = nn.Linear(8, 8)
        self.proj = Conv1D(8, 8)
        self.lstm = nn.LSTM(8, 8)
        self.gru = nn.GRUCell(8, 8)
        self.mha = nn.MultiheadAttention(8, 2)
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight  # tied
        self.register_buffer("table", torch.randn(4, 4))


def test_module_weights_by_layer_type():
    picked = selection.module_weights(Odd())
    assert picked == {
        "fc.weight", "proj.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "gru.weight_ih", "gru.weight_hh",
        "mha.in_proj_weight", "mha.out_proj.weight", "emb.weight", "head.weight",
    }
    # By name alone the custom parameter and the 2-D norm weight would be taken as weights.
    sd = Odd().state_dict()
    by_name = {n for n, t in sd.items() if selection.default_selector(n, t)}
    assert by_name - picked == {"weight", "norm.weight"}


def test_filter_fn_replaces_the_default():
    only_fc = selection.module_weights(Odd(), lambda name, mod, t: isinstance(mod, nn.Linear) and name == "weight")
    assert only_fc == {"fc.weight", "mha.out_proj.weight", "head.weight"}


def test_selector_checks_names():
    sd = Odd().state_dict()
    with pytest.raises(SwsEncodeError, match="not in the state_dict"):
        selection.selector(sd, ["fc.weight", "nope"], sd)
    with pytest.raises(SwsEncodeError, match="tensor names or a"):
        selection.selector(sd, "fc.weight", sd)


def test_prune_and_cluster_module_leaves_non_weights_alone():
    torch.manual_seed(0)
    m = Odd()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    out = prune_and_cluster(m, prune=0.5, clusters=4)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())  # not inplace: untouched
    for k in ("weight", "norm.weight", "table", "fc.bias"):
        assert torch.equal(out[k], before[k])
    assert out["fc.weight"].unique().numel() <= 5 and out["head.weight"] is out["emb.weight"]
    prune_and_cluster(m, prune=0.5, clusters=4, inplace=True)
    assert m.fc.weight.unique().numel() <= 5 and torch.equal(m.weight, before["weight"])
    assert torch.equal(m.fc.weight, out["fc.weight"])


def test_encode_module_codes_layer_weights_and_stores_the_rest(tmp_path):
    torch.manual_seed(0)
    m = Odd()
    prune_and_cluster(m, prune=0.5, clusters=4, inplace=True)
    swsformat.encode(m, tmp_path / "m.sws", smallest=False)
    kinds = {t["name"]: t["kind"] for t in swsformat.inspect(tmp_path / "m.sws")}
    assert kinds["weight"] == kinds["norm.weight"] == "raw" and kinds["head.weight"] == "alias"
    assert all(kinds[n] == "sws" for n in selection.module_weights(m) - {"head.weight"})
    sd = swsformat.load_state_dict(tmp_path / "m.sws")
    assert all(torch.equal(sd[k], v) for k, v in m.state_dict().items())
    # The same tensors as a bare state_dict: the unquantized custom weight is taken by its name.
    with pytest.raises(SwsEncodeError, match="'weight'.*distinct non-zero values"):
        swsformat.encode(m.state_dict(), tmp_path / "sd.sws")


ODD_MODULE = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.LayerNorm([2, 32])
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.scale(x.reshape(-1, 2, 32))).mean(1)))
'''


def test_cli_selects_by_layer_type_with_module(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = user_module(tmp_path, "odd.py", ODD_MODULE)
    torch.manual_seed(0)
    model = ns["Net"]()
    with torch.no_grad():
        model.scale.weight.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), "odd.pt")
    assert main(["encode", "odd.pt", "-o", "odd.sws", "--prune", "0.5", "--clusters", "8", "--module", "odd.py:Net"]) == 0
    capsys.readouterr()
    sd = swsformat.load_state_dict("odd.sws")
    assert torch.equal(sd["scale.weight"], model.scale.weight.detach())  # the norm is not quantized
    assert sd["fc1.weight"].unique().numel() <= 9
    # Without the module the 2-D norm weight looks like a weight and is quantized with the rest.
    assert main(["encode", "odd.pt", "-o", "bare.sws", "--prune", "0.5", "--clusters", "8"]) == 0
    assert swsformat.load_state_dict("bare.sws")["scale.weight"].unique().numel() <= 9


def test_weight_normed_layers_are_named_not_skipped_silently():
    from torch.nn.utils.parametrizations import weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(8, 8)), nn.ReLU(), nn.Linear(8, 2))
    with pytest.warns(UserWarning, match=r"1 layer\(s\) compute their weight .*: '0'; .*remove_parametrizations"):
        picked = selection.module_weights(model)
    assert picked == {"2.weight"}
    assert swsformat.prune_and_cluster is prune_and_cluster  # the top-level name the README uses
