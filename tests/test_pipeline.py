"""Post-processing after retraining: pruning masks, quantization-aware fine-tuning, the snap."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from swsformat.retrain.data import Split
from swsformat.retrain.models import compressible_parameters
from swsformat.retrain.pipeline import prune_masks, quantization_aware_finetune_, quantize_model_, round_biases_
from swsformat.retrain.prior import Mixture

MIX = Mixture(np.array([0.0, -0.5, 0.25, 0.5]), np.array([0.05, 0.05, 0.05, 0.05]), np.array([0.9, 0.03, 0.04, 0.03]))


def _toy(seed: int = 0) -> tuple[nn.Module, Split]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for _, p in compressible_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, Split(x, y)


def test_prune_masks_follow_the_assignment_rule():
    model, _ = _toy()
    masks = prune_masks(model, MIX, "nearest")
    for (_, p), m in zip(compressible_parameters(model), masks):
        w = p.detach().double().numpy()
        nearest = np.abs(w[..., None] - MIX.means).argmin(-1)
        assert m.shape == p.shape and m.dtype == torch.bool
        assert np.array_equal(m.numpy(), nearest != 0)


def test_snap_keeps_pruned_weights_exactly_zero_and_others_on_nonzero_means():
    model, _ = _toy()
    masks = prune_masks(model, MIX, "map")
    before = [p.detach().clone() for _, p in compressible_parameters(model)]
    frac, used = quantize_model_(model, MIX, masks)
    kept = total = 0
    for (_, p), m, w in zip(compressible_parameters(model), masks, before):
        assert torch.all(p[~m] == 0)
        # Each survivor lands on the closest non-zero mean (never on zero).
        expect = MIX.means[1:][np.abs(w[m].double().numpy()[:, None] - MIX.means[1:]).argmin(1)]
        assert np.array_equal(p[m].detach().double().numpy(), expect.astype(np.float32).astype(np.float64))
        kept += int(m.sum())
        total += m.numel()
    assert frac == kept / total
    assert 1 <= used <= 3


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_quantization_aware_finetune_keeps_zeros_and_beats_a_plain_snap(distill):
    import copy

    model, data = _toy()
    # Train the float net first so there is something to lose at the snap.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    masks = prune_masks(model, MIX, "nearest")
    plain = _toy()[0]
    plain.load_state_dict(model.state_dict())
    quantize_model_(plain, MIX, masks)
    teacher = copy.deepcopy(model).eval()
    quantization_aware_finetune_(
        model, MIX, masks, data, epochs=30, lr=1e-2, batch_size=64, progress=False, teacher=teacher, distill=distill
    )
    for (_, p), m in zip(compressible_parameters(model), masks):
        assert torch.all(p[~m] == 0), "a pruned weight moved during fine-tuning"
    quantize_model_(model, MIX, masks)

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(data.x), data.y))

    assert loss(model) < loss(plain)


def test_adam_is_fused_where_torch_has_the_kernel_and_matches_the_default():
    from swsformat.retrain.train import adam

    torch.manual_seed(0)
    a = nn.Linear(20, 5)
    b = nn.Linear(20, 5)
    b.load_state_dict(a.state_dict())
    fused, plain = adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    assert fused.defaults["fused"] is True
    x = torch.randn(64, 20)
    for _ in range(20):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert not adam([torch.zeros(2, device="meta", requires_grad=True)]).defaults["fused"]


def test_round_biases_rounds_the_biases_in_place():
    model, data = _toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert round_biases_(model, "float16", data, tolerance=100.0) == ["0.bias", "2.bias"]
    params = dict(model.named_parameters())
    for n in ("0.bias", "2.bias"):
        assert torch.equal(params[n], before[n].half().float())
        assert not torch.equal(params[n], before[n])  # random biases are not all float16 values
    for n in ("0.weight", "2.weight"):
        assert torch.equal(params[n], before[n])
    assert round_biases_(model, "float32", data, tolerance=100.0) == []
    assert round_biases_(model, "bfloat16", data, tolerance=100.0) == ["0.bias", "2.bias"]
    assert torch.equal(params["0.bias"], before["0.bias"].half().float().bfloat16().float())


@pytest.mark.parametrize("case", ["costly", "overflow"])
def test_round_biases_keeps_float32_when_rounding_costs_accuracy_or_overflows(case):
    model, data = _toy()
    params = dict(model.named_parameters())
    tolerance = -1.0 if case == "costly" else 100.0  # "costly": any rounding counts as too costly
    if case == "overflow":
        with torch.no_grad():
            params["2.bias"][0] = 1e6  # beyond float16's 65504
    before = {n: p.detach().clone() for n, p in params.items()}
    assert round_biases_(model, "float16", data, tolerance) == []
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("clusters", [0, 4])
def test_compress_stores_biases_in_float16_and_decodes_them_exactly(tmp_path, clusters):
    import swsformat
    from swsformat.retrain import CompressConfig, PriorConfig, RetrainConfig
    from swsformat.retrain.pipeline import compress

    model, data = _toy()
    # pi_zero 0.9: the untrained toy keeps weights in every layer (0.99 empties its last layer).
    cfg = CompressConfig(
        prior=PriorConfig(pi_zero=0.9),
        retrain=RetrainConfig(epochs=1, batch_size=128), qat_epochs=1, finetune_epochs=0, bias_clusters=clusters,
        bias_tolerance=100.0, remove_dead=False,  # the two runs below must keep the same units
    )
    path = tmp_path / "toy.sws"
    result = compress(model, data, data, cfg, path=path, progress=False)
    entries = {e["name"]: e for e in swsformat.read_header(path)["tensors"]}
    assert entries["0.bias"]["dtype"] == entries["2.bias"]["dtype"] == "float16"
    assert entries["0.weight"]["dtype"] == "float32"
    sd = swsformat.load_state_dict(path)
    assert sd["0.bias"].dtype == torch.float16
    if clusters:  # shared values: at most 4 distinct ones per bias, whichever form was smaller
        assert all(len(torch.unique(sd[n])) <= clusters for n in ("0.bias", "2.bias"))
    fresh, _ = _toy(seed=1)
    loaded = swsformat.load_model(path, fresh)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert result.file_bytes == path.stat().st_size
    # The same run with float32 biases: 2 bytes more for each of the 19 raw biases.
    f32 = compress(_toy()[0], data, data, replace(cfg, bias_dtype="float32"), path=tmp_path / "f32.sws", progress=False)
    assert f32.file_bytes > result.file_bytes
    if not clusters:
        raw16, raw32 = (swsformat.size_report(p)["raw_bits"] for p in (path, tmp_path / "f32.sws"))
        assert raw32 - raw16 == 16 * (16 + 3)


def test_bias_dtype_is_checked():
    from swsformat.retrain import CompressConfig

    with pytest.raises(ValueError, match="bias_dtype"):
        CompressConfig(bias_dtype="int8")


def test_compress_on_the_gpu_code_path_matches_the_kernel_path(tmp_path, monkeypatch):
    """The whole job through the prior's torch expressions (what a CUDA run takes) writes a
    file that loads and prunes the same weights as the numba kernel path."""
    import swsformat
    from swsformat.retrain import CompressConfig, PriorConfig, RetrainConfig
    from swsformat.retrain import prior as prior_mod
    from swsformat.retrain.pipeline import compress

    cfg = CompressConfig(prior=PriorConfig(pi_zero=0.9), retrain=RetrainConfig(epochs=2, batch_size=64), qat_epochs=1,
                         finetune_epochs=0)
    results = {}
    for route, devices in (("kernel", ("cpu",)), ("torch", ())):
        monkeypatch.setattr(prior_mod, "KERNEL_DEVICES", devices)
        model, data = _toy()
        results[route] = compress(model, data, data, cfg, path=tmp_path / f"{route}.sws", progress=False)
    sd = {k: swsformat.load_state_dict(tmp_path / f"{k}.sws") for k in results}
    for name, t in sd["kernel"].items():
        if name.endswith("weight"):
            assert torch.equal(t == 0, sd["torch"][name] == 0), name
    assert results["torch"].nonzero_fraction == results["kernel"].nonzero_fraction


def test_compress_refuses_a_collapsed_model_and_writes_nothing(tmp_path):
    """The untrained toy under the default prior loses its whole last layer: an error with the
    numbers and what to change, and no file."""
    import swsformat
    from swsformat.retrain import CompressConfig, RetrainConfig
    from swsformat.retrain.pipeline import compress

    model, data = _toy()
    cfg = CompressConfig(retrain=RetrainConfig(epochs=1, batch_size=128), qat_epochs=1, finetune_epochs=0)
    with pytest.raises(swsformat.SwsTrainingError, match=r"layers \['2.weight'\] lost every weight.*tau"):
        compress(model, data, data, cfg, path=tmp_path / "toy.sws", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_a_users_metric_near_its_no_weights_value_is_a_collapse():
    """With a metric of the user's, the collapse level is measured with the coded weights zeroed
    (and then restored), so a regression net is guarded as a classifier is."""
    import swsformat
    from swsformat.retrain.pipeline import check_not_collapsed

    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    x = torch.randn(64, 4)
    y = model(x).detach()
    weight = model.weight.detach().clone()

    def mse(m: nn.Module) -> float:
        with torch.no_grad():
            return float(((m(x) - y) ** 2).mean())

    null = float(((model.bias.detach() - y) ** 2).mean())
    named = [("weight", model.weight)]
    check_not_collapsed(model, None, 0.0, 0.5 * null, named, measure=mse)
    with pytest.raises(swsformat.SwsTrainingError, match=r"near the model's with every coded weight zero.*Nothing was written"):
        check_not_collapsed(model, None, 0.0, 0.9 * null, named, measure=mse)
    assert torch.equal(model.weight.detach(), weight)
    check_not_collapsed(model, None, 0.0, 0.9 * null, named)  # no metric: only empty layers count
    for before, after in ((0.0, float("nan")), (float("nan"), 0.1), (0.0, float("inf"))):
        with pytest.raises(swsformat.SwsTrainingError, match="must return a finite number"):
            check_not_collapsed(model, None, before, after, named, measure=mse)
    # A higher-is-better metric (here -MSE) is better with no weights than trained: the check says so.
    with pytest.warns(UserWarning, match="lower-is-better"):
        check_not_collapsed(model, None, 0.0, -0.1 * null, named, measure=lambda m: -mse(m))


def test_the_default_evaluation_refuses_what_is_not_classification():
    import swsformat
    from swsformat.retrain import evaluate

    model = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    with pytest.raises(swsformat.SwsTrainingError, match="evaluate_fn"):
        evaluate(model, [(x, torch.randn(8, 1))])
    with pytest.raises(swsformat.SwsTrainingError, match="no samples"):
        evaluate(nn.Linear(4, 3), [])
    assert evaluate(nn.Linear(4, 3), [(x, torch.zeros(8, dtype=torch.long))]) in {100.0 * k / 8 for k in range(9)}


def test_distillation_loss_is_cross_entropy_at_weight_0_and_zero_against_itself_at_1():
    from torch.nn import functional as F

    from swsformat.retrain import distillation_loss

    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    assert torch.equal(distillation_loss(model, 0.0)(model, x, y), F.cross_entropy(model(x), y))
    assert float(distillation_loss(model, 1.0)(model, x, y).detach()) == pytest.approx(0.0, abs=1e-6)
    other = nn.Linear(5, 3)
    assert float(distillation_loss(other, 1.0)(model, x, y).detach()) > 0.0


def test_compress_and_encode_check_the_output_path_before_any_work(tmp_path):
    import swsformat
    from swsformat.retrain import compress

    model = nn.Linear(4, 3)
    x, y = torch.randn(8, 4), torch.zeros(8, dtype=torch.long)

    def never(m: nn.Module) -> float:
        raise AssertionError("evaluated: the work began before the output path was checked")

    for kwargs in ({"path": tmp_path / "missing" / "m.sws"}, {"path": tmp_path},
                   {"checkpoint": tmp_path / "missing" / "c.ckpt"}):
        with pytest.raises(swsformat.SwsOutputError):
            compress(model, [(x, y)], [(x, y)], evaluate_fn=never, progress=False, **kwargs)
    with pytest.raises(swsformat.SwsOutputError, match="does not exist"):
        swsformat.encode(model, tmp_path / "missing" / "m.sws")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
