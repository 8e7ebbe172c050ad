"""Bayesian Compression (group normal-Jeffreys): the layers, their KL, pruning whole groups,
the rounding grid, and the driver writing a .sws file that decodes to the same model."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import swsformat
from swsformat.retrain.bayesian import (
    BayesianCompression,
    BayesianCompressionConfig,
    GroupNJConv2d,
    GroupNJLinear,
    bayesian_compress,
)
from swsformat.retrain.data import Split

from .test_method import blobs, error, trained_mlp


class TinyConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 3, padding=1)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(F.max_pool2d(self.conv(x), 2)).flatten(1))


def test_layers_start_as_the_pretrained_function_and_their_kl_is_finite():
    torch.manual_seed(0)
    net = TinyConv()
    x = torch.randn(5, 1, 8, 8)
    before = net(x)
    bc = BayesianCompression(net, dataset_size=100)
    assert isinstance(net.conv, GroupNJConv2d) and isinstance(net.fc, GroupNJLinear)
    net.eval()
    # z starts at 1 +- 1%: the eval-mode function is the pretrained one up to that.
    assert torch.allclose(net(x), before, rtol=0.1, atol=0.05)
    kl = bc.kl_loss()
    assert torch.isfinite(kl) and kl > 0
    net.train()
    a, b = net(x), net(x)
    assert not torch.equal(a, b)  # local reparameterisation: noisy in training
    kl.backward()
    assert net.conv.z.logvar.grad is not None and net.fc.weight_logvar.grad is not None


def test_finalize_prunes_whole_groups_and_rounds_to_a_grid():
    torch.manual_seed(0)
    net = TinyConv()
    bc = BayesianCompression(net, dataset_size=100, threshold=-3.0)
    with torch.no_grad():  # filters 1 and 4 and inputs 0..9 of fc made noise
        net.conv.z.logvar[[1, 4]] = 2.0
        net.fc.z.logvar[:10] = 2.0
    done = bc.finalize_()
    assert type(net.conv) is nn.Conv2d and type(net.fc) is nn.Linear
    assert done.groups_kept == {"conv": (4, 6), "fc": (86, 96)}
    w = net.conv.weight.detach()
    assert not w[[1, 4]].any() and not net.conv.bias[[1, 4]].any() and w[0].any()
    assert not net.fc.weight[:, :10].any() and net.fc.weight[:, 10:].any()
    for name in ("conv", "fc"):
        values = dict(net.named_modules())[name].weight.detach()
        steps = values / done.step[name]
        assert torch.allclose(steps, steps.round(), atol=1e-3)
    out = net(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 3)
    with pytest.raises(swsformat.SwsTrainingError, match="remove the layer"):
        other = TinyConv()
        bc2 = BayesianCompression(other, dataset_size=10)
        with torch.no_grad():
            other.fc.z.logvar.fill_(5.0)
        bc2.finalize_()


def test_bayesian_compress_end_to_end(tmp_path):
    torch.set_num_threads(1)
    x, y = blobs(2000, 0)
    xt, yt = blobs(1000, 1)
    model = trained_mlp()
    cfg = BayesianCompressionConfig(epochs=30, batch_size=50, threshold=-1.0)
    result = bayesian_compress(model, Split(x, y), Split(xt, yt), cfg, path=tmp_path / "bc.sws", progress=False)
    kept, total = result.groups_kept["2"]
    assert kept < total  # whole hidden units went
    assert result.quantized_error < 5 and result.nonzero_fraction < 0.9
    back = swsformat.load_model(tmp_path / "bc.sws", copy.deepcopy(model))
    assert error(back, xt, yt) == pytest.approx(error(model, xt, yt))
    assert result.file_bytes == (tmp_path / "bc.sws").stat().st_size


def test_bad_inputs():
    with pytest.raises(ValueError, match="dataset_size"):
        BayesianCompression(trained_mlp(), dataset_size=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        BayesianCompression(nn.Sequential(nn.ReLU()), dataset_size=10)
    with pytest.raises(ValueError, match="padding_mode"):
        BayesianCompression(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), dataset_size=10)
    with pytest.raises(ValueError, match="max_levels"):
        BayesianCompressionConfig(max_levels=1)


def wide_posterior() -> tuple[TinyConv, BayesianCompression]:
    """A Bayesian TinyConv whose weights' posterior stds are 0.3: the paper's grid is coarse."""
    torch.manual_seed(0)
    net = TinyConv()
    bc = BayesianCompression(net, dataset_size=100)
    with torch.no_grad():
        for layer in bc.layers.values():
            layer.weight_logvar.fill_(math.log(0.3**2))
    return net, bc


def test_finalize_refines_a_coarse_grid_until_the_check_holds():
    """Posterior stds left wide by a short training make the paper's grid coarse: with a
    check, each layer's step is halved until the measured error is within the tolerance."""
    x = torch.randn(64, 1, 8, 8)
    net, bc = wide_posterior()
    net.eval()
    with torch.no_grad():
        reference = net(x)

    def deviation(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(x) - reference).abs().mean())

    coarse = bc.finalize_()
    assert deviation(net) > 0.05
    net, bc = wide_posterior()
    fine = bc.finalize_(check=deviation, tolerance=0.01)
    assert deviation(net) <= 0.01
    assert all(fine.step[n] < coarse.step[n] for n in fine.step)
    assert all(fine.step[n] * 2**k == pytest.approx(coarse.step[n]) for n in fine.step
               for k in [round(math.log2(coarse.step[n] / fine.step[n]))])


@pytest.mark.parametrize("which", ["gamma", "inverse-gamma"])
def test_horseshoe_kl_terms_match_monte_carlo(which):
    """The closed-form KL(log-normal || Gamma(1/2) / inverse Gamma(1/2)) of the horseshoe's
    factors against E_q[log q - log p] from a million draws."""
    from torch.distributions import Gamma, InverseGamma, LogNormal

    from swsformat.retrain.bayesian import _kl_lognormal_gamma, _kl_lognormal_invgamma

    torch.manual_seed(0)
    for mu, logvar, scale in [(0.0, -1.0, 1.0), (-2.0, 0.5, 1e-2), (1.0, -4.0, 3.0)]:
        m, lv = torch.tensor(mu, dtype=torch.float64), torch.tensor(logvar, dtype=torch.float64)
        q = LogNormal(m, (0.5 * lv).exp())
        if which == "gamma":
            p, exact = Gamma(torch.tensor(0.5, dtype=torch.float64), 1 / torch.tensor(scale)), _kl_lognormal_gamma(m, lv, scale)
        else:
            p, exact = InverseGamma(torch.tensor(0.5, dtype=torch.float64), torch.tensor(scale)), _kl_lognormal_invgamma(m, lv, scale)
        x = q.sample((1_000_000,))
        terms = q.log_prob(x) - p.log_prob(x)
        standard_error = float(terms.std()) / 1000
        assert abs(float(exact) - float(terms.mean())) < 4 * standard_error + 1e-6


def test_horseshoe_layers_train_prune_and_write_a_file(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = TinyConv()
    x = torch.randn(5, 1, 8, 8)
    before = net(x)
    bc = BayesianCompression(net, dataset_size=100, prior="horseshoe")
    net.eval()
    assert torch.allclose(net(x), before, rtol=0.1, atol=0.05)  # z starts near 1
    kl = bc.kl_loss()
    assert torch.isfinite(kl)
    net.train()
    kl.backward()
    assert net.conv.z.local_logvar.grad is not None and net.fc.z.global_mu.grad is not None
    names = {g["name"]: len(g["params"]) for g in bc.param_groups()}
    # per layer: weight and bias means; the scales' 4 log-normal parameters and 2 log-variances
    assert names == {"network": 2 * 2, "log_parameters": 2 * 6}
    xs, ys = blobs(2000, 0)
    xt, yt = blobs(1000, 1)
    model = trained_mlp()
    cfg = BayesianCompressionConfig(prior="horseshoe", epochs=50, batch_size=50, threshold=-1.5)
    result = bayesian_compress(model, Split(xs, ys), Split(xt, yt), cfg, path=tmp_path / "hs.sws", progress=False)
    kept, total = result.groups_kept["2"]
    assert kept < total and result.quantized_error < 5
    assert "group horseshoe" in swsformat.open(tmp_path / "hs.sws").metadata()["sws.method"]
    back = swsformat.load_model(tmp_path / "hs.sws", copy.deepcopy(model))
    assert error(back, xt, yt) == pytest.approx(error(model, xt, yt))


def test_finalize_changes_nothing_when_a_later_layer_would_be_emptied():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    bc = BayesianCompression(net, dataset_size=100)
    with torch.no_grad():
        net[2].z.logvar.fill_(5.0)
    with pytest.raises(swsformat.SwsTrainingError, match="remove the layer"):
        bc.finalize_()
    assert isinstance(net[0], GroupNJLinear) and isinstance(net[2], GroupNJLinear)


def test_finalize_reports_the_step_it_used_when_the_halvings_run_out():
    net, bc = wide_posterior()
    calls = iter([0.0] + [1.0] * 100)  # the unrounded model scores 0, every rounding 1: never within 0
    done = bc.finalize_(check=lambda m: next(calls), tolerance=0.0, max_halvings=2)
    for name in ("conv", "fc"):
        w = dict(net.named_modules())[name].weight.detach()
        units = w / done.step[name]
        assert torch.allclose(units, units.round(), atol=1e-3)
        assert (units.round().abs() % 2 == 1).any()  # the grid used is this step, not twice it


def test_finalized_zeros_are_positive_zeros():
    """A negative mean rounded or masked to zero is -0.0, which a file stores bit-exactly as an
    entry: finalize_ writes +0.0 so that pruned and rounded-away weights cost nothing."""
    net, bc = wide_posterior()  # a coarse grid: many weights round to zero
    with torch.no_grad():
        net.conv.z.logvar[[1, 4]] = 2.0
    bc.finalize_()
    for t in (net.conv.weight, net.conv.bias, net.fc.weight):
        zeros = t.detach() == 0
        assert zeros.any() and not torch.signbit(t.detach()[zeros]).any()


def test_finalize_can_keep_the_structure_only():
    """``round_values=False``: groups pruned as before, the kept weights at their posterior
    means (for another method to quantize), not on a grid."""
    torch.manual_seed(0)
    net = TinyConv()
    bc = BayesianCompression(net, dataset_size=100, threshold=-3.0)
    with torch.no_grad():
        net.conv.z.logvar[[1, 4]] = 2.0
        net.fc.z.logvar[:10] = 2.0
    means = {n: layer.posterior()[0].clone() for n, layer in bc.layers.items()}
    done = bc.finalize_(round_values=False)
    assert done.groups_kept == {"conv": (4, 6), "fc": (86, 96)}
    assert not net.conv.weight[[1, 4]].any() and not net.fc.weight[:, :10].any()
    assert torch.equal(net.fc.weight[:, 10:], means["fc"][:, 10:])
    assert torch.equal(net.conv.weight[[0, 2, 3, 5]], means["conv"][[0, 2, 3, 5]])
    assert done.bits == {"conv": 32, "fc": 32}
    assert torch.unique(net.fc.weight).numel() > 255  # nothing snapped to a grid


@pytest.mark.slow
def test_bc_retrain_script_keeps_the_structure_and_writes_its_file(small_mnist, tmp_path):
    """scripts/bc_retrain.py on a Bayesian Compression file, tiny budget: the retrained file keeps
    no weight outside the BC file's structure, each layer uses at most --clusters values, and it
    decodes to the error its JSON records; a file of another method is refused."""
    import json
    import sys

    from swsformat.retrain import data
    from swsformat.retrain.train import evaluate

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        import bayesian_compression
        import bc_retrain
    finally:
        sys.path.pop(0)
    out = tmp_path / "methods"
    bayesian_compression.main(["--model", "lenet300-100", "--epochs", "1", "--out", str(out)])
    source = out / "lenet300-100-bayesian-compression.sws"
    bc_retrain.main(["--model", "lenet300-100", "--source", str(source), "--retrain-epochs", "1", "--qat-epochs", "1",
                     "--finetune-epochs", "1", "--clusters", "4", "--out", str(out)])
    path = out / "lenet300-100-bc-retrained-jeffreys.sws"
    record = json.loads(path.with_suffix(".json").read_text())
    before, after = swsformat.load_state_dict(source), swsformat.load_state_dict(path)
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert not bool((after[name][before[name] == 0] != 0).any())
        assert torch.unique(after[name][after[name] != 0]).numel() <= 4
    assert json.loads(swsformat.open(path).metadata()["sws.method"])["method"] == "bc-retrained"
    _, test = data.load("mnist", normalization="standard")
    assert evaluate(swsformat.load_model(path), test) == pytest.approx(record["decoded_test_error"])
    assert record["decoded_test_error"] == pytest.approx(record["quantized_error"])
    with pytest.raises(SystemExit, match="not a Bayesian Compression file"):
        bc_retrain.main(["--model", "lenet300-100", "--source", str(path), "--out", str(out)])
    # --prune-within: every layer keeps at most half of its structure, under its own stem.
    bc_retrain.main(["--model", "lenet300-100", "--source", str(source), "--retrain-epochs", "2", "--qat-epochs", "1",
                     "--finetune-epochs", "0", "--prune-within", "0.5", "--stem", "within", "--out", str(out)])
    within = swsformat.load_state_dict(out / "lenet300-100-within.sws")
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        structure = int(before[name].count_nonzero())
        assert not bool((within[name][before[name] == 0] != 0).any())
        assert 0 < int(within[name].count_nonzero()) <= structure - structure // 2


def test_prune_within_drops_exactly_its_share_when_magnitudes_tie():
    """A BC file's weights sit on a few rounded levels: pruning 15% of a layer must take 15% of
    its weights, not every weight that shares the cut's magnitude."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    try:
        from bc_retrain import _prune_within
    finally:
        sys.path.pop(0)
    w = torch.nn.Parameter(torch.tensor([[0.5, -0.5, 0.0, 0.25], [0.25, -0.25, 0.5, 0.0]]).repeat(10, 1))
    mask = w.detach() != 0
    structure = [int(mask.sum())]  # 60
    (m,) = _prune_within([w], [mask], structure, 0.15)
    assert int(m.sum()) == 60 - 9 and bool((w.detach()[~m] == 0).all())
    assert int((w.detach().abs() == 0.25).sum()) == 30 - 9  # the 9 go from the smallest level only
    (m,) = _prune_within([w], [m], structure, 0.15)  # already there: nothing more
    assert int(m.sum()) == 51
