"""The mixture prior against a plain numpy/scipy reference."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from torch import nn

from swsformat.retrain import prior as prior_mod
from swsformat.retrain._prior_kernel import (
    ORDER_CHUNK,
    _exact_one,
    mixture_param_grads,
    mixture_params,
    nll_and_grads,
    nll_and_grads_f32,
    table_gradients,
    table_pass,
    value_order,
)
from swsformat.retrain.prior import (
    Mixture,
    MixturePrior,
    PriorConfig,
    initial_means,
    merge_components,
    mixture_nll_many,
)


def mixture_nll(w, mu, log_prec, log_pi):
    return mixture_nll_many([w], mu, log_prec, log_pi)


def reference_nll(w, mu, log_prec, log_pi):
    sd = np.exp(-0.5 * log_prec)
    lp = log_pi[None, :] + stats.norm.logpdf(w[:, None], mu[None, :], sd[None, :])
    return -logsumexp(lp, axis=1).sum()


def random_mixture(j=6, seed=0):
    rng = np.random.default_rng(seed)
    mu = np.concatenate([[0.0], rng.uniform(-0.5, 0.5, j - 1)])
    log_prec = rng.uniform(2, 9, j)
    log_pi = np.log(rng.dirichlet(np.ones(j)))
    return mu, log_prec, log_pi


@pytest.mark.parametrize("device", ["cpu", "cpu-torch-path", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_nll_and_gradients_match_reference(device, monkeypatch):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if device == "cpu-torch-path":  # the GPU code path (torch expressions) on CPU tensors, for CI
        monkeypatch.setattr(prior_mod, "KERNEL_DEVICES", ())
        device = "cpu"
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.2, 5000)
    mu, log_prec, log_pi = random_mixture()
    args = [torch.tensor(a, dtype=torch.float64, device=device, requires_grad=True) for a in (w, mu, log_prec, log_pi)]
    loss = mixture_nll(*args)
    assert float(loss.detach()) == pytest.approx(reference_nll(w, mu, log_prec, log_pi), rel=1e-9)
    grads = torch.autograd.grad(loss, args)
    # Central finite differences of the scipy reference for every mixture parameter.
    for k, base in enumerate((w, mu, log_prec, log_pi)):
        if k == 0:
            idx = [0, 17, 4999]
        else:
            idx = range(base.size)
        for i in idx:
            h = 1e-6
            up, dn = [a.copy() for a in (w, mu, log_prec, log_pi)], [a.copy() for a in (w, mu, log_prec, log_pi)]
            up[k][i] += h
            dn[k][i] -= h
            fd = (reference_nll(*up) - reference_nll(*dn)) / (2 * h)
            assert float(grads[k][i]) == pytest.approx(fd, rel=1e-4, abs=1e-4)


@pytest.mark.parametrize("std", [0.25, 0.02, 0.003])
def test_float32_kernel_matches_float64(std):
    """The vectorised float32 training kernel against the exact float64 one, per tensor."""
    rng = np.random.default_rng(2)
    mu, log_prec, log_pi = random_mixture(j=16)
    log_prec = np.full(16, -2 * math.log(std))
    shapes = [(300, 784), (5,), (7, 3, 5, 5)]  # block remainders and several tensors
    ws = [rng.normal(0, 0.15, s) for s in shapes]
    t32 = [torch.tensor(w, dtype=torch.float32, requires_grad=True) for w in ws]
    t64 = [torch.tensor(w, dtype=torch.float64, requires_grad=True) for w in ws]
    params = [[torch.tensor(a, dtype=dt, requires_grad=True) for a in (mu, log_prec, log_pi)] for dt in (torch.float32, torch.float64)]
    l32 = mixture_nll_many(t32, *params[0])
    l64 = mixture_nll_many(t64, *params[1])
    assert float(l32.detach()) == pytest.approx(float(l64.detach()), rel=2e-6)
    l32.backward()
    l64.backward()
    for a, b in zip(t32 + params[0], t64 + params[1]):
        assert a.grad.shape == b.grad.shape
        # float32 logits of weights far from a narrow component carry ~1e-7 * lambda * d^2
        # nats of rounding, which moves responsibilities by ~1e-4 at std 0.003: float32's
        # own limit (a torch float32 expression has it too), not the kernel's.
        scale = float(b.grad.abs().max())
        assert float((a.grad.double() - b.grad).abs().max()) <= 1e-4 * scale


def test_float32_out_of_range_falls_back_to_exact():
    w = torch.tensor([0.0, 3e10], dtype=torch.float32, requires_grad=True)
    mu, log_prec, log_pi = (torch.tensor(a, dtype=torch.float32) for a in ([0.0, 0.5], [10.0, 10.0], [-0.1, -2.4]))
    loss = mixture_nll(w, mu, log_prec, log_pi)
    ref = reference_nll(w.detach().double().numpy(), *(t.double().numpy() for t in (mu, log_prec, log_pi)))
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-6)


def test_no_nan_when_a_component_collapses():
    w = torch.tensor([0.0, 1e-9, 0.3, -0.3], dtype=torch.float32, requires_grad=True)
    mu = torch.tensor([0.0, 0.3, 5.0], requires_grad=True)
    log_prec = torch.tensor([60.0, 40.0, 80.0], requires_grad=True)  # variances down to 1e-35
    log_pi = torch.log(torch.tensor([0.98, 0.01, 0.01])).requires_grad_()
    loss = mixture_nll(w, mu, log_prec, log_pi)
    loss.backward()
    for t in (loss, w.grad, mu.grad, log_prec.grad, log_pi.grad):
        assert torch.isfinite(t.detach()).all()


def test_hyper_priors_match_scipy():
    cfg = PriorConfig(components=4, learn_pi_zero=True, pi_zero=0.9, gamma_zero=(50.0, 2.0), gamma_other=(5.0, 0.5), pi_zero_beta=(30.0, 3.0))
    prior = MixturePrior(torch.randn(100) * 0.1, cfg)
    with torch.no_grad():
        prior.log_precisions.copy_(torch.tensor([3.0, 1.0, 2.0, 0.5]))
    got = float(prior.hyper_nll().detach())
    lam = np.exp(prior.log_precisions.detach().numpy().astype(np.float64))
    # Gamma density over log-precision = Gamma(lambda) * lambda (Jacobian); Beta over the logit likewise.
    ref = -(stats.gamma.logpdf(lam[0], 50.0, scale=1 / 2.0) + np.log(lam[0]))
    ref -= sum(stats.gamma.logpdf(x, 5.0, scale=1 / 0.5) + np.log(x) for x in lam[1:])
    p0 = 0.9
    ref -= stats.beta.logpdf(p0, 30.0, 3.0) + np.log(p0 * (1 - p0))
    # Both sides drop different constants: compare differences between two settings instead.
    with torch.no_grad():
        prior.log_precisions.add_(0.25)
        prior.pi_zero_logit.add_(0.3)
    got2 = float(prior.hyper_nll().detach())
    lam2 = lam * math.exp(0.25)
    p02 = 1 / (1 + math.exp(-(math.log(p0 / (1 - p0)) + 0.3)))
    ref2 = -(stats.gamma.logpdf(lam2[0], 50.0, scale=1 / 2.0) + np.log(lam2[0]))
    ref2 -= sum(stats.gamma.logpdf(x, 5.0, scale=1 / 0.5) + np.log(x) for x in lam2[1:])
    ref2 -= stats.beta.logpdf(p02, 30.0, 3.0) + np.log(p02 * (1 - p02))
    assert got2 - got == pytest.approx(ref2 - ref, rel=1e-4)


def test_mixing_proportions_sum_to_one_and_zero_is_fixed():
    prior = MixturePrior(torch.randn(100), PriorConfig(components=8, pi_zero=0.99))
    pi = prior.log_mixing().exp().detach()
    assert float(pi.sum()) == pytest.approx(1.0, abs=1e-6)
    assert float(pi[0]) == pytest.approx(0.99, abs=1e-6)
    assert not prior.pi_zero_logit.requires_grad
    assert float(prior.all_means()[0].detach()) == 0.0


def test_initial_means_spread_and_none_near_zero():
    w = torch.linspace(-0.6, 0.6, 1001)
    m = initial_means(w, 15)
    assert m.numel() == 15
    step = 1.2 / 15
    assert float(m.abs().min()) >= step * 0.49
    assert float(m.min()) == pytest.approx(-0.6) and float(m.max()) == pytest.approx(0.6)


def test_merge_merges_close_components_and_keeps_far_ones():
    mix = Mixture(np.array([0.0, 0.2, 0.2005, -0.3, 0.001]), np.array([0.01, 0.01, 0.01, 0.01, 0.01]), np.array([0.9, 0.03, 0.03, 0.02, 0.02]))
    merged, n = merge_components(mix, threshold=1.0)
    assert n == 2
    assert sorted(np.round(merged.means, 4)) == [-0.3, 0.0, 0.2003]
    assert merged.means[0] == 0.0  # merging into the zero component keeps mean 0
    assert merged.pi.sum() == pytest.approx(1.0)
    same, none = merge_components(mix, threshold=0.0)
    assert none == 0 and len(same.means) == 5


def test_quantize_snaps_to_means_and_zeros_are_exact():
    from swsformat.retrain.pipeline import prune_masks, quantize_model_

    mix = Mixture(np.array([0.0, 0.25, -0.25]), np.array([0.02, 0.02, 0.02]), np.array([0.9, 0.05, 0.05]))
    layer = nn.Linear(5, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.001, -0.003, 0.24, -0.26, 0.0]]))
    fraction, used = quantize_model_(layer, mix, prune_masks(layer, mix))
    assert layer.weight.tolist() == [[0.0, 0.0, 0.25, -0.25, 0.0]]
    assert (fraction, used) == (0.4, 2)
    assert torch.signbit(layer.weight).sum() == 1  # the zeros are +0.0 exactly, only -0.25 is negative


def test_config_validation():
    with pytest.raises(ValueError, match="components"):
        PriorConfig(components=1)
    with pytest.raises(ValueError, match="pi_zero"):
        PriorConfig(pi_zero=1.0)


def _prior_pair(learn_pi_zero: bool, dtype: torch.dtype) -> tuple[MixturePrior, MixturePrior]:
    """Two identical priors with non-trivial parameters (one for each gradient path)."""
    torch.manual_seed(3)
    cfg = PriorConfig(components=6, learn_pi_zero=learn_pi_zero, pi_zero=0.9)
    a = MixturePrior(torch.randn(500) * 0.1, cfg)
    with torch.no_grad():
        a.log_precisions.add_(torch.randn(6))
        a.mixing_logits.add_(torch.randn(5))
        a.pi_zero_logit.add_(0.3)
    a = a.to(dtype)
    b = MixturePrior(torch.randn(500) * 0.1, cfg).to(dtype)
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("learn_pi_zero", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_complexity_grad_equals_autograd(learn_pi_zero, dtype):
    """The training loop's in-place gradient equals ``(scale * complexity).backward()``:
    weights with and without an existing ``.grad``, one frozen weight, every prior parameter."""
    a, b = _prior_pair(learn_pi_zero, dtype)
    rng = np.random.default_rng(4)
    shapes = [(300, 70), (9,), (4, 3, 5, 5)]
    base = [torch.tensor(rng.normal(0, 0.15, s), dtype=dtype) for s in shapes]
    wa = [t.clone().requires_grad_(i != 1) for i, t in enumerate(base)]
    wb = [t.clone().requires_grad_(i != 1) for i, t in enumerate(base)]
    existing = torch.tensor(rng.normal(0, 1, shapes[0]), dtype=dtype)
    wa[0].grad, wb[0].grad = existing.clone(), existing.clone()
    scale = 0.37
    value = a.complexity(wa)
    (scale * value).backward()
    got = b.add_complexity_grad_(wb, scale)
    assert got == pytest.approx(float(value.detach()), rel=1e-6)
    assert wb[1].grad is None
    tol = 2e-5 if dtype == torch.float32 else 1e-9
    for x, y in [(wa[0], wb[0]), (wa[2], wb[2])] + list(zip(a.parameters(), b.parameters())):
        if x.grad is None:
            assert y.grad is None
            continue
        assert float((x.grad - y.grad).abs().max()) <= tol * float(x.grad.abs().max())


def test_add_complexity_grad_non_contiguous_weight_takes_autograd():
    a, b = _prior_pair(False, torch.float32)
    w = torch.randn(40, 30).mul_(0.1)
    wa, wb = w.clone().t().requires_grad_(), w.clone().t().requires_grad_()
    (2.0 * a.complexity([wa])).backward()
    assert b.add_complexity_grad_([wb], 2.0) == pytest.approx(float(a.complexity([wa]).detach()), rel=1e-6)
    assert torch.allclose(wa.grad, wb.grad, rtol=1e-5, atol=1e-6)


def test_float32_far_weights_match_reference():
    """Weights whose every logit lies far below the largest ``c_j`` (tight components, weights
    far from all of them) take the kernel's exact per-weight path."""
    mu = np.array([0.0, 0.2, -0.3])
    log_prec = np.array([12.0, 11.0, 3.0])
    log_pi = np.log(np.array([0.9, 0.05, 0.05]))
    w = np.concatenate([np.linspace(-0.05, 0.05, 300), [0.6, -1.5, 2.5]])
    t = torch.tensor(w, dtype=torch.float32, requires_grad=True)
    params = [torch.tensor(x, dtype=torch.float32) for x in (mu, log_prec, log_pi)]
    loss = mixture_nll(t, *params)
    ref = reference_nll(t.detach().double().numpy(), mu, log_prec, log_pi)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-6)
    loss.backward()
    t64 = torch.tensor(t.detach().double().numpy(), requires_grad=True)
    mixture_nll(t64, *(torch.tensor(x) for x in (mu, log_prec, log_pi))).backward()
    far = slice(300, None)
    assert torch.allclose(t.grad[far].double(), t64.grad[far], rtol=1e-5)


def test_nan_weight_gives_non_finite_complexity():
    _, prior = _prior_pair(False, torch.float32)
    w = torch.zeros(1000)
    w[700] = float("nan")
    w.requires_grad_()
    assert not math.isfinite(prior.add_complexity_grad_([w], 1.0))
    assert torch.isnan(w.grad[700]) and torch.isfinite(w.grad[:700]).all()


def _converged_mixture(j: int = 16, std: float = 0.006, zero_std: float = 0.02):
    """A mixture like LeNet-300-100's from its fourth retraining epoch on, and weights drawn
    from it: float32 means, precisions and log-normalisers for the kernels."""
    rng = np.random.default_rng(5)
    mu = np.concatenate([[0.0], np.linspace(-0.4, 0.4, j - 1)])
    lam = np.full(j, std**-2.0)
    lam[0] = zero_std**-2.0
    pi = np.full(j, 0.01 / (j - 1))
    pi[0] = 0.99
    c = np.log(pi) + 0.5 * np.log(lam) - 0.5 * math.log(2 * math.pi)
    comp = np.where(rng.random(40_000) < 0.95, 0, rng.integers(1, j, 40_000))
    w = mu[comp] + rng.normal(0, 1, comp.size) * np.where(comp == 0, zero_std, std)
    return w.astype(np.float32), [a.astype(np.float32) for a in (mu, lam, c)], (mu, lam, c)


def test_value_order_groups_each_chunk_by_value():
    rng = np.random.default_rng(6)
    n = 2 * ORDER_CHUNK + 1000  # two whole chunks and a partial one
    w = (rng.normal(0, 0.05, n)).astype(np.float32)
    w[[3, ORDER_CHUNK + 7, n - 1]] = [np.nan, np.inf, -np.inf]
    order = value_order(w)
    assert order.dtype == np.int32
    assert np.array_equal(np.sort(order), np.arange(n))
    for s in range(0, n, ORDER_CHUNK):
        idx = order[s : s + ORDER_CHUNK]
        assert idx.min() == s and idx.max() == min(n, s + ORDER_CHUNK) - 1  # never leaves its chunk
        v = w[idx]
        finite = np.isfinite(v)
        assert not finite[np.argmin(finite):].any()  # non-finite values last
        v = v[finite]
        width = (v.max() - v.min()) / (len(idx) // 32)
        assert np.diff(v).min() >= -width * (1 + 1e-6)  # sorted up to one bucket's width
    assert np.array_equal(value_order(np.full(10, 0.5, np.float32)), np.arange(10))
    assert value_order(np.zeros(0, np.float32)).size == 0


@pytest.mark.parametrize("how", ["natural", "grouped", "random"])
@pytest.mark.parametrize("std", [0.25, 0.006, 0.002])
def test_float32_kernel_any_order_matches_float64(how, std):
    """Skipping out-of-reach components is exact to float32 in any order; a value-grouped
    order makes it skip most of them once the mixture has converged."""
    w, p32, p64 = _converged_mixture(std=std)
    n, j = w.size, p32[0].size
    order = {"natural": np.empty(0, np.int32), "grouped": value_order(w),
             "random": np.random.default_rng(7).permutation(n).astype(np.int32)}[how]
    g32 = np.full(n, 0.5, np.float32)
    acc32, work = nll_and_grads_f32(w, order, *p32, g32, 2.0, True)
    g64 = np.zeros(n)
    acc64 = nll_and_grads(w.astype(np.float64), *p64, g64, 1.0, False)
    assert acc32[0, 0] == pytest.approx(acc64[0, 0], rel=1e-6)
    for row in (1, 2, 3):
        assert np.abs(acc32[row] - acc64[row]).max() <= 1e-4 * np.abs(acc64[row]).max()
    assert np.abs((g32 - 0.5) / 2 - g64).max() <= 1e-4 * np.abs(g64).max()
    if how == "grouped" and std < 0.25:
        assert work < 0.35 * n * j
    elif how != "grouped" or std == 0.25:
        assert work > 0.9 * n * j


def test_training_path_groups_weights_only_while_it_pays():
    """The training loop runs the kernel in value order once the mixture is narrow, in
    natural order while it is wide, and gets the same gradient either way."""
    w, _, (mu, lam, c) = _converged_mixture()
    cfg = PriorConfig(components=16, init_std=0.006, init_zero_std=0.02)
    narrow = MixturePrior(torch.from_numpy(w), cfg)
    with torch.no_grad():
        narrow.means.copy_(torch.from_numpy(mu[1:]).float())
    wide = MixturePrior(torch.from_numpy(w), PriorConfig(components=16))
    for prior, pays in ((narrow, True), (wide, False)):
        t = torch.from_numpy(w.copy()).requires_grad_()
        prior.add_complexity_grad_([t], 1.0)
        assert prior.grouping == (int(pays), 1)
        ref = torch.from_numpy(w.copy()).requires_grad_()
        prior.complexity([ref]).backward()  # natural order, through autograd
        assert torch.allclose(t.grad, ref.grad, rtol=1e-4, atol=1e-4 * float(ref.grad.abs().max()))


@pytest.mark.parametrize("seed", range(20))
def test_mixture_helpers_match_the_numpy_expressions(seed):
    """The training path's parameter arithmetic, in numba, against the plain numpy expressions
    (``exp``/``log`` elementwise from libm, as the helpers use)."""
    np_exp, np_log = (np.vectorize(f, otypes=[np.float64]) for f in (math.exp, math.log))
    rng = np.random.default_rng(seed)
    j = int(rng.integers(2, 40))
    means, logits = (rng.normal(0, s, j - 1).astype(np.float32) for s in (0.3, 2.0))
    log_prec = rng.uniform(-2, 14, j).astype(np.float32)
    z = float(rng.normal(3, 2))
    mu, lam, c, soft, lp, ok = mixture_params(means, log_prec, logits, z, 1e30)
    lp_ref = log_prec.astype(np.float64)
    lg = logits.astype(np.float64)
    soft_ref = np_exp(lg - lg.max())
    soft_ref /= soft_ref.sum()
    log_pi = np.concatenate([[-np.logaddexp(0.0, -z)], np_log(soft_ref) - np.logaddexp(0.0, z)])
    c_ref = log_pi + 0.5 * lp_ref - 0.5 * math.log(2.0 * math.pi)
    for got, want in [(mu, np.concatenate([[0.0], means.astype(np.float64)])), (lam, np_exp(lp_ref)), (c, c_ref), (soft, soft_ref), (lp, lp_ref)]:
        np.testing.assert_allclose(got, want, rtol=1e-13, atol=0)
    assert ok
    assert not mixture_params(means, log_prec, logits, z, 1.0)[-1]  # a precision above the limit
    acc = rng.normal(0, 100, (4, j))
    shape, rate = rng.uniform(1, 5000, j), rng.uniform(0.01, 3, j)
    g_means, g_lp, g_logits, g_pi0, rest_sum, hyper = mixture_param_grads(acc, lp, soft, shape, rate)
    g_pi = -acc[3]
    rest = g_pi[1:]
    close = dict(rtol=1e-12, atol=1e-9)
    assert np.array_equal(g_means, -acc[1][1:])
    np.testing.assert_allclose(g_lp, acc[2] + 0.5 * g_pi + rate * np_exp(lp_ref) - shape, **close)
    np.testing.assert_allclose(g_logits, rest - soft_ref * rest.sum(), **close)
    assert g_pi0 == g_pi[0] and rest_sum == pytest.approx(rest.sum(), rel=1e-12, abs=1e-9)
    assert hyper == pytest.approx(float((rate * np_exp(lp_ref) - shape * lp_ref).sum()), rel=1e-12)


def test_gpu_training_path_run_on_cpu_matches_the_kernel_path(monkeypatch):
    """Retraining epochs through the torch expressions and autograd (the path CUDA tensors
    take) reach the same weights and mixture as through the numba kernels."""
    from swsformat.retrain.data import Split
    from swsformat.retrain.train import (
        PriorGradient,
        RetrainConfig,
        SplitBatches,
        default_prior,
        make_optimizer,
        train_epoch,
    )

    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(512, 1, 28, 28, generator=g), torch.randint(0, 10, (512,), generator=g))
    cfg = RetrainConfig(batch_size=64)

    def run(kernel: bool) -> tuple[nn.Module, MixturePrior, float]:
        monkeypatch.setattr(prior_mod, "KERNEL_DEVICES", ("cpu",) if kernel else ())
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
        prior = default_prior(model, PriorConfig(learn_pi_zero=True))
        opt = make_optimizer(model, prior, cfg)
        gen = torch.Generator().manual_seed(1)
        hook = PriorGradient(prior, [model[1].weight, model[3].weight])
        losses = [train_epoch(model, opt, SplitBatches(data, cfg.batch_size, gen),
                              after_backward=hook.new_epoch(0.5 / len(data)), progress=False)[0] for _ in range(2)]
        return model, prior, losses[-1]

    km, kp, kloss = run(kernel=True)
    tm, tp, tloss = run(kernel=False)
    assert tloss == pytest.approx(kloss, rel=1e-5)
    for (name, a), b in zip(km.named_parameters(), tm.parameters()):
        assert torch.allclose(a, b, rtol=0, atol=2e-5), name
    for (name, a), b in zip(kp.named_parameters(), tp.parameters()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), name


_KERNEL_DIGEST = """
import hashlib
import numpy as np
from swsformat.retrain._prior_kernel import nll_and_grads_f32, value_order
rng = np.random.default_rng(11)
j = 16
mu = np.concatenate([[0.0], np.linspace(-0.3, 0.3, j - 1)]).astype(np.float32)
lam = np.concatenate([[1e4], np.full(j - 1, 2e3)]).astype(np.float32)
c = (np.log(np.full(j, 0.01 / (j - 1))) + 0.5 * np.log(lam)).astype(np.float32)
c[0] = np.log(0.99) + 0.5 * np.log(lam[0])
w = np.concatenate([rng.normal(0, 0.01, 60_000), rng.uniform(-0.35, 0.35, 20_000)]).astype(np.float32)
h = hashlib.sha256()
for order in (np.empty(0, np.int32), value_order(w)):
    gw = np.zeros_like(w)
    acc, work = nll_and_grads_f32(w, order, mu, lam, c, gw, 1.0, False)
    h.update(acc.tobytes() + gw.tobytes())
stats = nll_and_grads_f32.stats
print(h.hexdigest(), "hit" if stats.cache_hits else "miss")
"""


@pytest.mark.slow
def test_float32_kernel_rounds_alike_compiled_or_loaded_from_cache(tmp_path):
    """numba optimises a kernel it compiles in the process and the same kernel loaded from its
    cache differently; with fast-math reassociation and contraction the two rounded
    differently and a first run after an install trained to other weights than later runs.
    The kernel pins its arithmetic down in the source (``_EXACT``, ``_fma``, ``LANES``)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    runs = [
        subprocess.run([sys.executable, "-c", _KERNEL_DIGEST], env=env, capture_output=True, text=True, timeout=600)
        for _ in range(2)
    ]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (d1, how1), (d2, how2) = (r.stdout.split() for r in runs)
    assert (how1, how2) == ("miss", "hit")
    assert d1 == d2


def _learn_mixture(weights: torch.Tensor, config: PriorConfig, steps: int = 60) -> MixturePrior:
    """The prior's own parameters after ``steps`` Adam steps on fixed weights (kernel path)."""
    prior = MixturePrior(weights, config)
    opt = torch.optim.Adam(prior.param_groups(lr_means=1e-2, lr_log_precisions=1e-2, lr_mixing=1e-2))
    for _ in range(steps):
        opt.zero_grad()
        prior.add_complexity_grad_([weights], 1e-3)
        opt.step()
    return prior


@pytest.mark.parametrize("scale_to_weights", [True, False])
def test_scale_to_weights_learns_the_same_mixture_on_any_scale(scale_to_weights):
    """Weights k times larger (a transformer's 0.02 against LeNet's 0.05) learn the mixture k
    times wider with ``scale_to_weights``: means times k, log-precisions minus 2 log k, the same
    mixing. With absolute units (the default) the hyper-priors pull the two apart."""
    rng = np.random.default_rng(0)
    base = np.concatenate([rng.normal(0, 0.01, 4000), rng.normal(0.12, 0.01, 500), rng.normal(-0.1, 0.01, 500)])
    k = 0.125
    config = PriorConfig(components=6, scale_to_weights=scale_to_weights)
    a = _learn_mixture(torch.tensor(base), config)
    b = _learn_mixture(torch.tensor(base * k), config)
    if scale_to_weights:
        assert float(b.unit) == pytest.approx(k * float(a.unit), rel=1e-12)
    same = [
        np.allclose(b.means.detach().numpy(), k * a.means.detach().numpy(), rtol=1e-4, atol=1e-7),
        np.allclose(b.log_precisions.detach().numpy(), a.log_precisions.detach().numpy() - 2 * math.log(k),
                    atol=1e-4),
        np.allclose(b.log_mixing().detach().numpy(), a.log_mixing().detach().numpy(), atol=1e-4),
    ]
    assert all(same) if scale_to_weights else not all(same)


def test_scale_to_weights_unit_is_saved_and_old_states_read_as_absolute():
    w = torch.randn(1000) * 0.02
    scaled = MixturePrior(w, PriorConfig(scale_to_weights=True))
    assert float(scaled.unit) == pytest.approx(float(w.double().square().mean().sqrt()) / prior_mod.REFERENCE_RMS)
    fresh = MixturePrior(torch.randn(1000), PriorConfig(scale_to_weights=True))
    fresh.load_state_dict(scaled.state_dict())
    assert fresh._rates() == scaled._rates()
    old = {k: v for k, v in scaled.state_dict().items() if k != "unit"}  # saved before the setting existed
    fresh.load_state_dict(old)
    assert float(fresh.unit) == 1.0 and fresh._rates() == (2.0, 0.1)
    with pytest.warns(UserWarning, match="all zero"):
        zero = MixturePrior(torch.zeros(10), PriorConfig(scale_to_weights=True))
    assert float(zero.unit) == 1.0
    with pytest.raises(ValueError, match="finite"):
        MixturePrior(torch.tensor([1.0, float("inf")]), PriorConfig(scale_to_weights=True))
    halved = scaled.half()  # a dtype change keeps the unit (and what a checkpoint saves of it)
    assert halved.unit.dtype == torch.float32 and float(halved.unit) == scaled._unit


def _table_run(prior: MixturePrior, w: torch.Tensor, monkeypatch, table: bool) -> tuple[float, np.ndarray, list]:
    monkeypatch.setattr(prior_mod, "TABLE_MIN", 1000 if table else 1 << 62)
    monkeypatch.setattr(prior_mod, "TABLE_MIN_TENSOR", 1000)
    w.grad = None
    for p in prior.parameters():
        p.grad = None
    value = prior.add_complexity_grad_([w], 0.5)
    return value, w.grad.numpy().copy(), [p.grad.numpy().copy() for p in prior.parameters() if p.grad is not None]


def test_table_path_matches_the_exact_kernel(monkeypatch):
    """Large float32 tensors take the interpolated table on the training path: its value,
    weight gradients and mixture gradients stay within 1e-3 and 3e-3 of the exact kernel's, also after
    the weights moved out of the grid span kept from the last call, and a NaN still shows."""
    w_np, _, (mu, lam, _) = _converged_mixture()
    prior = MixturePrior(torch.tensor(w_np), PriorConfig(components=16))
    with torch.no_grad():
        prior.means.copy_(torch.tensor(mu[1:]))
        prior.log_precisions.copy_(torch.tensor(np.log(lam)))
    w = torch.tensor(w_np, requires_grad=True)
    for moved in (False, True):
        if moved:  # a few weights beyond the span the first table call kept
            with torch.no_grad():
                w[:50] = torch.linspace(0.6, 0.9, 50)
        exact = _table_run(prior, w, monkeypatch, table=False)
        table = _table_run(prior, w, monkeypatch, table=True)
        assert table[0] == pytest.approx(exact[0], rel=1e-5)
        assert np.abs(table[1] - exact[1]).max() <= 1e-3 * np.abs(exact[1]).max()
        for a, b in zip(table[2], exact[2]):  # sums of terms that nearly cancel at convergence
            assert np.abs(a - b).max() <= 3e-3 * np.abs(b).max()
        # The span is kept for the next call, unless more than 1/1024 of the weights left it.
        assert bool(prior._spans) is not moved
    _table_run(prior, w, monkeypatch, table=True)
    assert prior._spans  # a NaN must not slip through a kept span's range test
    with torch.no_grad():
        w[7] = float("nan")
    value, grad, _ = _table_run(prior, w, monkeypatch, table=True)
    assert not math.isfinite(value) and np.isnan(grad[7]) and np.isfinite(np.delete(grad, 7)).all()


def test_table_path_shares_one_grid_across_a_calls_tensors(monkeypatch):
    """Several tensors of one call on one grid spanning all of them (one half as wide as the
    other): each within 1e-3 of the exact kernel, the small tensor on the exact kernel, and a
    tensor with a NaN taken exactly on its own while the others keep the table."""
    w_np, _, (mu, lam, _) = _converged_mixture()
    rng = np.random.default_rng(8)
    narrow = w_np[np.abs(w_np) < 0.2]
    big = [np.tile(w_np, 3)[:100_000], np.tile(narrow, 2)[:70_000], rng.normal(0, 0.02, 2000).astype(np.float32)]
    prior = MixturePrior(torch.tensor(np.concatenate(big)), PriorConfig(components=16))
    with torch.no_grad():
        prior.means.copy_(torch.tensor(mu[1:]))
        prior.log_precisions.copy_(torch.tensor(np.log(lam)))
    ws = [torch.tensor(a, requires_grad=True) for a in big]

    def run(table: bool) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
        monkeypatch.setattr(prior_mod, "TABLE_MIN", 1000 if table else 1 << 62)
        for t in [*ws, *prior.parameters()]:
            t.grad = None
        value = prior.add_complexity_grad_(ws, 0.5)
        return value, [w.grad.numpy().copy() for w in ws], [p.grad.numpy().copy() for p in prior.parameters()
                                                             if p.grad is not None]

    exact, table = run(False), run(True)
    assert sorted(prior._spans) == [0, 1]
    assert table[0] == pytest.approx(exact[0], rel=1e-5)
    for a, b in zip(table[1], exact[1]):
        assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    assert np.array_equal(table[1][2], exact[1][2])
    for a, b in zip(table[2], exact[2]):
        assert np.abs(a - b).max() <= 3e-3 * np.abs(b).max()
    prior.reset_grouping()
    with torch.no_grad():
        ws[1][5] = float("nan")
    value, grads, _ = run(True)
    assert sorted(prior._spans) == [0] and not math.isfinite(value)
    assert np.isnan(grads[1][5]) and np.isfinite(np.delete(grads[1], 5)).all()
    assert np.abs(grads[0] - exact[1][0]).max() <= 1e-3 * np.abs(exact[1][0]).max()


def test_table_path_hands_sharp_turns_to_the_exact_path(monkeypatch):
    """Between two narrow components far apart the gradient flips sign over much less than a
    grid cell: weights there take the exact path, so no weight's gradient is off by more than
    about 1e-4 of the largest (interpolating across such a cell was 20% off)."""
    rng = np.random.default_rng(0)
    n = 1 << 18
    clustered = np.concatenate([rng.normal(m, 0.002, int(0.9 * n * p)) for m, p in ((0.0, 0.9), (-0.1, 0.05), (0.1, 0.05))])
    w_np = np.concatenate([clustered, rng.uniform(-0.12, 0.12, n - clustered.size)]).astype(np.float32)
    prior = MixturePrior(torch.tensor(w_np), PriorConfig(components=3, pi_zero=0.9))
    with torch.no_grad():
        prior.means.copy_(torch.tensor([-0.1, 0.1]))
        prior.log_precisions.fill_(-2 * math.log(0.002))
    w = torch.tensor(w_np, requires_grad=True)
    exact = _table_run(prior, w, monkeypatch, table=False)
    table = _table_run(prior, w, monkeypatch, table=True)
    assert np.abs(table[1] - exact[1]).max() <= 2e-4 * np.abs(exact[1]).max()


def test_table_path_is_the_same_on_any_thread_count(monkeypatch):
    import numba

    w_np, _, _ = _converged_mixture()
    prior = MixturePrior(torch.tensor(w_np), PriorConfig(components=16))
    w = torch.tensor(w_np, requires_grad=True)
    before = torch.get_num_threads()
    try:
        runs = []
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            torch.set_num_threads(threads)  # the kernels take torch's thread count
            prior.reset_grouping()
            runs.append(_table_run(prior, w, monkeypatch, table=True))
    finally:
        torch.set_num_threads(before)
    (v1, g1, p1), (v2, g2, p2) = runs
    assert v1 == v2 and np.array_equal(g1, g2) and all(np.array_equal(a, b) for a, b in zip(p1, p2))


def test_table_pass_counts_and_gradients_against_numpy():
    """The table pass on its own, against its definition in numpy: every served weight's
    gradient interpolated in its cell and its share of the cell's two grid points counted
    exactly (integers; the packed counts are unpacked every 1M weights, and here 2.2M weights
    share one cell near its right end, so unpacking happens mid-cell; a packed fraction would
    overflow only past 2M weights per row between unpackings, 8.4M in one cell, not tried
    here), and the weights outside the grid, in cells that are not smooth or not finite taken
    exactly; on one thread as on two."""
    rng = np.random.default_rng(3)
    n = 2_500_003
    w = (rng.standard_normal(n) * 0.05).astype(np.float32)
    w[:2_200_000] = -0.3 + 75.99 * 0.004
    rng.shuffle(w)
    w[::10007] = 3.0
    w[[11, 2_000_001]] = np.nan
    w[[12, 1_048_600]] = -np.inf
    mu, lam, c = np.array([0.0, -0.08, 0.08]), np.array([1e4, 4e4, 4e4]), np.array([-0.1, -3.0, -3.0])
    x0, h = -0.3, 0.004
    points = int(0.6 / h) + 2
    table, smooth = table_gradients(x0, h, points, mu, lam, c, 1e-4)
    smooth[40:45] = False
    before = rng.standard_normal(n).astype(np.float32)
    runs = []
    for threads in (1, 2):
        gw = before.copy()
        runs.append((gw, *table_pass(w, x0, 1.0 / h, table, smooth, gw, 0.5, True, threads, mu, lam, c)))
    (gw, counts, off, outside), two = runs
    assert np.array_equal(gw, two[0], equal_nan=True) and np.array_equal(counts, two[1]) and outside == two[3]

    pos = (w - np.float32(x0)) * np.float32(1.0 / h)
    with np.errstate(invalid="ignore"):
        inside = (pos >= 0) & (pos < points - 1)
    k = np.where(inside, pos, 0).astype(np.int64)
    served = inside & smooth[k]
    f = (pos - k.astype(np.float32))[served]
    ks = k[served]
    q = (f * np.float32(1 << 16) + np.float32(0.5)).astype(np.int64)
    expected = np.zeros(points, np.int64)
    np.add.at(expected, ks, (1 << 16) - q)
    np.add.at(expected, ks + 1, q)
    assert np.array_equal(counts, expected)
    assert outside == int((~inside).sum())
    g = f.astype(np.float64) * (table[ks + 1] - table[ks]) + table[ks]
    np.testing.assert_allclose(gw[served], before[served] + 0.5 * g.astype(np.float32), rtol=1e-6, atol=1e-6)
    rest = np.flatnonzero(~served)
    acc, e = np.zeros((4, 3)), np.empty(3)
    exact = np.array([_exact_one(float(w[i]), mu, lam, c, acc, e) for i in rest], np.float32)
    np.testing.assert_allclose(gw[rest], before[rest] + np.float32(0.5) * exact, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(off, acc, rtol=1e-9)


def test_kernels_run_on_torchs_thread_count():
    """Under torchrun each process has one torch thread; numba's default (a thread per core in
    every process) oversubscribed the cores. The kernels follow torch's count and leave
    numba's setting as it was."""
    import numba

    seen = []
    torch_before, numba_before = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        with prior_mod.kernel_threads():
            seen.append(numba.get_num_threads())
        assert seen == [1] and numba.get_num_threads() == numba_before
    finally:
        torch.set_num_threads(torch_before)


def test_starting_numba_threads_leaves_torchs_thread_count_alone():
    """numba's OpenMP layer set OpenMP's (torch's) thread count to numba's when it started:
    a torchrun worker's torch.set_num_threads(1) was undone by the first swsformat call."""
    import subprocess
    import sys

    code = ("import torch; torch.set_num_threads(1); torch.get_num_threads(); import numba, swsformat;"
            "from swsformat.retrain import prior; w = torch.randn(5000, requires_grad=True);"
            "p = prior.MixturePrior(w.detach()); p.add_complexity_grad_([w], 1.0); numba.get_num_threads();"
            "print(torch.get_num_threads())")
    env = {**os.environ, "NUMBA_THREADING_LAYER": "omp", "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split() == ["1"]
