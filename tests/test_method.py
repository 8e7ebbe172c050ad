"""Soft weight-sharing in a user's own loop (SoftWeightSharing), and compress() on DataLoaders
with a user's loss, evaluation and weight selection."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import swsformat
from swsformat import SoftWeightSharing
from swsformat.retrain import CompressConfig, PriorConfig, RetrainConfig
from swsformat.retrain.models import compressible_parameters


def blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Four Gaussian classes in 20 dimensions: easy, so training is short."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, 20, generator=torch.Generator().manual_seed(99)) * 2
    y = torch.randint(0, 4, (n,), generator=g)
    return centres[y] + torch.randn(n, 20, generator=g), y


def trained_mlp() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    x, y = blobs(2000, 0)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for idx in torch.randperm(2000).repeat(5).split(100):
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


def error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) != y).float().mean())


def test_fused_gradient_equals_autograd_of_the_complexity_loss():
    model = trained_mlp()
    sws = SoftWeightSharing(model, PriorConfig(learn_pi_zero=True), dataset_size=2000, tau=0.1)
    twin = copy.deepcopy(model)
    twin_sws = SoftWeightSharing(twin, PriorConfig(learn_pi_zero=True), dataset_size=2000, tau=0.1)
    twin_sws.load_state_dict(sws.state_dict())
    value = sws.add_complexity_grad_()
    loss = twin_sws.complexity_loss()
    loss.backward()
    assert value == pytest.approx(float(loss.detach()), rel=1e-5)
    for a, b in zip([*sws.weights, *sws.prior.parameters()], [*twin_sws.weights, *twin_sws.prior.parameters()]):
        if b.grad is not None:
            assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-6 * float(b.grad.abs().max()))


def own_loop(model: nn.Module, sws: SoftWeightSharing, x: torch.Tensor, y: torch.Tensor, epochs: int = 8) -> None:
    """A user's plain loop with the prior's fused gradient added after backward."""
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *sws.param_groups()])
    for _ in range(epochs):
        sws.new_epoch()
        for idx in torch.randperm(len(x)).split(20):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            sws.add_complexity_grad_()
            opt.step()


def test_own_loop_then_finalize_and_encode(tmp_path):
    model = trained_mlp()
    x, y = blobs(2000, 0)
    xt, yt = blobs(1000, 1)
    before = error(model, xt, yt)
    sws = SoftWeightSharing(model, PriorConfig(init_std=0.05), dataset_size=2000, tau=0.05)
    own_loop(model, sws, x, y)
    done = sws.finalize_()
    values = torch.cat([p.detach().flatten() for p in sws.weights]).unique()
    assert 0.0 in values.tolist() and len(values) <= done.mixture.means.size
    assert 0 < done.nonzero_fraction < 0.2 and done.values_used == len(values) - 1
    with pytest.raises(RuntimeError, match="finalize_"):
        SoftWeightSharing(trained_mlp(), dataset_size=10).finetune_([(x, y)])
    sws.finetune_([(x[i : i + 100], y[i : i + 100]) for i in range(0, 2000, 100)], epochs=2, progress=False)
    assert torch.cat([p.detach().flatten() for p in sws.weights]).unique().numel() <= values.numel()
    assert error(model, xt, yt) <= before + 2.0
    path = tmp_path / "mlp.sws"
    swsformat.encode(model, path, compress=sws.coded_names())
    back = swsformat.load_model(path, copy.deepcopy(model))
    assert error(back, xt, yt) == error(model, xt, yt)
    assert path.stat().st_size < sum(p.numel() for p in model.parameters()) * 4 / 5


@pytest.mark.slow
def test_compress_takes_dataloaders_a_loss_and_an_evaluation(tmp_path):
    model = trained_mlp()
    x, y = blobs(2000, 0)
    xt, yt = blobs(1000, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0))
    test_loader = DataLoader(TensorDataset(xt, yt), batch_size=500)
    calls = []

    def smooth_ce(m, xb, yb):
        calls.append(1)
        return F.cross_entropy(m(xb), yb, label_smoothing=0.05)

    cfg = CompressConfig(prior=PriorConfig(init_std=0.05), retrain=RetrainConfig(epochs=8, tau=0.05), qat_epochs=2,
                         finetune_epochs=1)
    result = swsformat.compress(model, loader, test_loader, cfg, path=tmp_path / "m.sws", loss_fn=smooth_ce,
                                progress=False)
    assert len(calls) == (8 + 2 + 1) * len(loader)
    assert result.quantized_error == pytest.approx(error(model, xt, yt))
    assert result.quantized_error < 5 and result.nonzero_fraction < 0.2
    back = swsformat.load_model(tmp_path / "m.sws", copy.deepcopy(model))
    assert error(back, xt, yt) == result.quantized_error
    # A custom evaluation (lower is better) replaces the classification error.
    result = swsformat.compress(trained_mlp(), loader, None, cfg, progress=False,
                                evaluate_fn=lambda m: F.cross_entropy(m(xt), yt).item())
    assert 0 < result.quantized_error < 1  # a cross-entropy, not a percentage


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 16)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 30, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2's wte and lm_head


def test_weight_selection_and_tied_weights():
    model = Tied()
    names = [n for n, _ in compressible_parameters(model)]
    assert names == ["emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "attn.in_proj_weight",
                     "attn.out_proj.weight"]  # the tie once, under its first name; no norm, no bias
    sws = SoftWeightSharing(model, dataset_size=100)
    assert sws.coded_names() == set(names) | {"head.weight"}
    only_lstm = SoftWeightSharing(model, dataset_size=100, filter_fn=lambda n, m, p: isinstance(m, nn.LSTM) and p.dim() == 2)
    assert [n for n, _ in only_lstm.named_weights] == ["lstm.weight_ih_l0", "lstm.weight_hh_l0"]
    with pytest.raises(ValueError, match="no weights"):
        SoftWeightSharing(model, dataset_size=100, filter_fn=lambda n, m, p: False)
    with pytest.raises(ValueError, match="dataset_size"):
        SoftWeightSharing(model, dataset_size=0)


@pytest.mark.slow
def test_text_lstm_script_runs_at_toy_size(tmp_path):
    """scripts/text_lstm.py (SoftWeightSharing on a byte-level LSTM) end to end, tiny budget."""
    import json
    import subprocess
    import sys

    from .conftest import ROOT

    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "text_lstm.py"), "--steps", "5", "--bytes", "100000", "--init-zero-std", "0.01",
                        "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["file_bytes"] == (tmp_path / "byte-lstm.sws").stat().st_size
    assert 0 < summary["nonzero_fraction"] < 1 and summary["provenance"]["versions"]["torch"] == torch.__version__
    coded = {n for n in swsformat.open(tmp_path / "byte-lstm.sws").keys()
             if swsformat.open(tmp_path / "byte-lstm.sws").entry(n).kind == "sws"}
    assert {"emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l0", "out.weight"} <= coded


@pytest.mark.slow
def test_text_gpt_script_runs_under_torchrun_at_toy_size(tmp_path):
    """scripts/text_gpt.py under torchrun with two gloo processes, tiny budget: the ranks end
    bit-identical, the tied output layer is stored once, the file decodes to the same model."""
    import json
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "scripts" / "text_gpt.py"), "--steps", "6", "--qat-steps", "3", "--width", "32", "--layers", "1",
           "--bytes", "100000", "--init-zero-std", "0.01", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ranks_identical"] and summary["tied_stored_once"] and summary["processes"] == 2
    assert summary["bits_per_byte"]["decoded_file"] == summary["bits_per_byte"]["final"]
    assert summary["file_bytes"] == (tmp_path / "byte-gpt.sws").stat().st_size


def test_bad_inputs_are_refused_before_any_work():
    model = trained_mlp()
    with pytest.raises(ValueError, match="float32 or float64"):
        SoftWeightSharing(trained_mlp().half(), dataset_size=10)
    with pytest.raises(ValueError, match="tau must be"):
        SoftWeightSharing(model, dataset_size=10, tau=float("inf"))
    with pytest.raises(ValueError, match="dataset_size"):
        SoftWeightSharing(model, dataset_size=True)
    assert SoftWeightSharing(model, dataset_size=__import__("numpy").int64(7)).dataset_size == 7
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(swsformat.SwsTrainingError, match="the model is unchanged"), pytest.warns(UserWarning):
        SoftWeightSharing(model, PriorConfig(pi_zero=0.999), dataset_size=10).finalize_()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="cross-entropy loss only"):
        swsformat.compress(model, [], None, CompressConfig(qat_distill=0.5), loss_fn=lambda m, x, y: m(x).sum())
    with pytest.raises(TypeError, match="pairs"):
        swsformat.compress(model, [{"x": 1}], None, CompressConfig(retrain=RetrainConfig(epochs=1)), progress=False,
                           evaluate_fn=lambda m: 0.0)


def test_dataset_size_follows_the_sampler():
    from torch.utils.data import DistributedSampler, SubsetRandomSampler

    from swsformat.retrain.train import dataset_size

    x, y = blobs(100, 0)
    assert dataset_size(DataLoader(TensorDataset(x, y), batch_size=10)) == 100
    assert dataset_size(DataLoader(TensorDataset(x, y), batch_size=10, sampler=SubsetRandomSampler(range(30)))) == 30
    # Under DDP each rank's sampler yields its share; the ranks together train on all 100.
    share = DistributedSampler(TensorDataset(x, y), num_replicas=2, rank=1)
    assert len(share) == 50 and dataset_size(DataLoader(TensorDataset(x, y), batch_size=10, sampler=share)) == 100


def test_deep_compression_prunes_iteratively_and_shares_values(tmp_path):
    from swsformat.retrain.deep_compression import DeepCompressionConfig, deep_compress

    model = trained_mlp()
    x, y = blobs(2000, 0)
    xt, yt = blobs(1000, 1)
    from swsformat.retrain.data import Split

    cfg = DeepCompressionConfig(prune_schedule=(0.5, 0.8, 0.9), retrain_epochs=2, clusters=8, finetune_epochs=1,
                                batch_size=50)
    result = deep_compress(model, Split(x, y), Split(xt, yt), cfg, path=tmp_path / "dc.sws", progress=False)
    assert [s["prune"] for s in result.step_errors] == [0.5, 0.8, 0.9]
    for layer in (model[0].weight, model[2].weight):
        assert 1 <= torch.unique(layer[layer != 0]).numel() <= 8
    assert result.nonzero_fraction == pytest.approx(0.1, abs=0.02)
    assert result.quantized_error < 5
    back = swsformat.load_model(tmp_path / "dc.sws", copy.deepcopy(model))
    assert error(back, xt, yt) == result.quantized_error
    assert "deep-compression" in swsformat.open(tmp_path / "dc.sws").metadata()["sws.method"]
    with pytest.raises(ValueError, match="must not decrease"):
        DeepCompressionConfig(prune_schedule=(0.9, 0.5))


def test_one_mixture_per_layer():
    """groups="layer": each weight tensor has its own prior; the term and its gradient are the
    sums of the separate priors', and each layer snaps to its own mixture's means."""
    model = trained_mlp()
    sws = SoftWeightSharing(model, PriorConfig(init_std=0.05), dataset_size=2000, tau=0.05, groups="layer")
    assert len(sws.prior.priors) == 2 and sws.prior.keys == ["0.weight", "2.weight"]
    assert [g["name"] for g in sws.param_groups()][:3] == ["means/0.weight", "log_precisions/0.weight",
                                                           "mixing/0.weight"]
    # Each prior starts from its own layer's range.
    for prior, w in zip(sws.prior.priors, sws.weights):
        means, w = prior.means.detach(), w.detach()
        assert float(means.min()) >= float(w.min()) - 1e-6 and float(means.max()) <= float(w.max()) + 1e-6
    twin = copy.deepcopy(model)
    alone = [SoftWeightSharing(twin, PriorConfig(init_std=0.05), dataset_size=2000, tau=0.05,
                               filter_fn=lambda n, m, p, k=k: p is twin[k].weight) for k in (0, 2)]
    for a, p in zip(alone, sws.prior.priors):
        a.prior.load_state_dict(p.state_dict())
    value = sws.add_complexity_grad_()
    assert value == pytest.approx(sum(a.add_complexity_grad_() for a in alone), rel=1e-9)
    for k in (0, 2):
        assert torch.equal(model[k].weight.grad, twin[k].weight.grad)
    x, y = blobs(2000, 0)
    own_loop(model, sws, x, y)
    done = sws.finalize_()
    assert isinstance(done.mixture, list) and len(done.mixture) == 2
    for w, mix in zip(sws.weights, done.mixture):
        values = w.detach().unique()
        allowed = torch.tensor(mix.means, dtype=torch.float32)
        assert all(bool((v == allowed).any()) for v in values), "a layer snapped to another layer's mean"
    sws.finetune_([(x[i : i + 100], y[i : i + 100]) for i in range(0, 2000, 100)], epochs=1, progress=False)
    by_key = SoftWeightSharing(trained_mlp(), dataset_size=10, groups=lambda name, p: "all")
    assert len(by_key.prior.priors) == 1
    with pytest.raises(ValueError, match="groups"):
        SoftWeightSharing(trained_mlp(), dataset_size=10, groups="layers")
    with pytest.raises(ValueError, match="string key"):
        SoftWeightSharing(trained_mlp(), dataset_size=10, groups=lambda name, p: 3)
    with pytest.raises(ValueError, match="prior_groups"):
        CompressConfig(prior_groups="per-layer")


@pytest.mark.slow
def test_compress_with_one_mixture_per_layer(tmp_path):
    x, y = blobs(2000, 0)
    xt, yt = blobs(1000, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=20, shuffle=True, generator=torch.Generator().manual_seed(0))
    cfg = CompressConfig(prior=PriorConfig(init_std=0.05), retrain=RetrainConfig(epochs=8, tau=0.05), qat_epochs=2,
                         finetune_epochs=1, prior_groups="layer")
    model = trained_mlp()
    result = swsformat.compress(model, loader, DataLoader(TensorDataset(xt, yt), batch_size=500), cfg,
                                path=tmp_path / "m.sws", progress=False)
    assert isinstance(result.mixture, list) and len(result.mixture) == 2
    assert result.quantized_error < 5 and result.nonzero_fraction < 0.3
    back = swsformat.load_model(tmp_path / "m.sws", copy.deepcopy(model))
    assert error(back, xt, yt) == pytest.approx(result.quantized_error)


def test_off_scale_weights_warn_unless_the_prior_scales_to_them():
    """Absolute hyper-priors on weights far from LeNet scale are a silent failure (a zero
    component that claims everything): the user is told, and the warning names the fix."""
    model = nn.Sequential(nn.Linear(50, 40), nn.ReLU(), nn.Linear(40, 10))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.02 / float(p.square().mean().sqrt()))
    with pytest.warns(UserWarning, match="scale_to_weights=True"):
        SoftWeightSharing(model, dataset_size=100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sws = SoftWeightSharing(model, PriorConfig(scale_to_weights=True), dataset_size=100)
    assert float(sws.prior.unit) == pytest.approx(0.02 / 0.05, rel=1e-3)


def test_mistakes_in_a_users_loop_get_clear_errors():
    """What a new user got silently wrong or as a long traceback: a wrapped model, a model cast
    after the prior was built, a second finalize_, an optimizer without the prior's groups,
    and the default cross-entropy on regression targets."""
    model = trained_mlp()
    with pytest.raises(ValueError, match=r"wrapper.module"):
        SoftWeightSharing(nn.DataParallel(model), dataset_size=10)
    sws = SoftWeightSharing(model, dataset_size=2000)
    model.half()
    with pytest.raises(swsformat.SwsTrainingError, match=r"float16.*only after finalize_"):
        sws.add_complexity_grad_()
    with pytest.raises(swsformat.SwsTrainingError, match=r"float16"):
        sws.complexity_loss()
    model.float()
    x, y = blobs(2000, 0)
    with pytest.warns(UserWarning, match=r"param_groups"), pytest.raises(swsformat.SwsTrainingError):
        sws.finalize_()  # untrained: the zero component claims every weight
    trained = SoftWeightSharing(trained_mlp(), PriorConfig(init_std=0.05), dataset_size=2000, tau=0.05)
    own_loop(trained.model, trained, x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained.finalize_()
    with pytest.raises(swsformat.SwsTrainingError, match=r"already called"):
        trained.finalize_()
    with pytest.raises(swsformat.SwsTrainingError, match=r"loss_fn"):
        trained.finetune_([(x[:100], torch.randn(100, 4))], epochs=1, progress=False)


def test_finalize_with_a_metric_refuses_a_collapse_and_puts_the_weights_back():
    """A regression net whose snapped weights are all tiny keeps every layer non-empty but
    predicts a constant: with ``evaluate_fn`` that is refused, as chance level is for a
    classifier, and the weights are as they were."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1))
    x = torch.linspace(-3, 3, 256).unsqueeze(1)
    y = torch.sin(x)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def mse(m: nn.Module) -> float:
        with torch.no_grad():
            return float(F.mse_loss(m(x), y))

    assert mse(model) < 0.05
    sws = SoftWeightSharing(model, dataset_size=256)
    with torch.no_grad():
        sws.prior.means.fill_(1e-4)
        sws.prior.means.add_(torch.arange(sws.prior.means.numel()) * 1e-6)
        sws.prior.pi_zero_logit.fill_(-20.0)
    before = [p.detach().clone() for p in sws.weights]
    with pytest.raises(swsformat.SwsTrainingError, match=r"collapsed.*near the model's with every coded weight zero"
                       r".*as they were before finalize_"):
        sws.finalize_(evaluate_fn=mse)
    assert all(torch.equal(p, q) for p, q in zip(sws.weights, before))
    assert not hasattr(sws, "masks")


def test_a_checkpoint_resumes_only_on_its_number_of_ranks():
    from swsformat.retrain.pipeline import _settings

    config = CompressConfig()
    assert _settings(config) == config.to_dict(drop_added_defaults=True)  # one process: as before
    assert _settings(config, 2) != _settings(config, 1)


def test_a_dataset_where_batches_belong_is_refused_before_any_work():
    x, y = blobs(300, 0)
    with pytest.raises(swsformat.SwsBatchError, match="train is a TensorDataset.*DataLoader"):
        swsformat.compress(trained_mlp(), TensorDataset(x, y), [(x, y)])
    with pytest.raises(swsformat.SwsBatchError, match="test is a TensorDataset"):
        swsformat.compress(trained_mlp(), DataLoader(TensorDataset(x, y), batch_size=50), TensorDataset(x, y))


def test_a_mixture_left_out_of_the_optimizer_is_reported_early():
    model = trained_mlp()
    x, y = blobs(400, 1)
    sws = SoftWeightSharing(model, dataset_size=400)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # the prior's groups are missing
    with pytest.warns(UserWarning, match="20 steps the mixture's parameters have not moved"):
        for _ in range(20):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            sws.add_complexity_grad_()
            opt.step()
    with pytest.raises(swsformat.SwsConfigError, match="no weights"):
        SoftWeightSharing(model, dataset_size=400, filter_fn=lambda name, module, param: False)
