"""Cost of the prior: one retraining epoch against one plain training epoch of the same model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from swsformat.retrain.data import Split
from swsformat.retrain.models import MODELS, build_model, compressible_parameters
from swsformat.retrain.prior import MixturePrior, initial_means
from swsformat.retrain.reproduce import best_config
from swsformat.retrain.train import (
    PriorGradient,
    RetrainConfig,
    SplitBatches,
    adam,
    default_prior,
    make_optimizer,
    train_epoch,
)

from .conftest import best_of, record

N = 10240
# The mixture of a LeNet-300-100 retraining from its fourth epoch on: non-zero components'
# std 0.0065, zero component 0.0245 with 95% of the weights, means about 0.06 apart
# (results/paper/lenet300-100.json: -0.58 ... 0.34).
CONVERGED_STD, CONVERGED_ZERO_STD, ZERO_SHARE, CONVERGED_REACH = 0.0065, 0.0245, 0.95, 0.45


def converge_(model: torch.nn.Module, prior: MixturePrior) -> None:
    """Put the prior and the weights in a converged state: narrow components, every weight
    drawn from one of them (random data cannot train a real one in a benchmark)."""
    rng = np.random.default_rng(0)
    with torch.no_grad():
        prior.log_precisions.fill_(-2 * np.log(CONVERGED_STD))
        prior.log_precisions[0] = -2 * np.log(CONVERGED_ZERO_STD)
        prior.means.copy_(initial_means(torch.tensor([-CONVERGED_REACH, CONVERGED_REACH]), prior.means.numel()))
        mu = np.concatenate([[0.0], prior.means.numpy()])
        for _, p in compressible_parameters(model):
            comp = np.where(rng.random(p.numel()) < ZERO_SHARE, 0, rng.integers(1, mu.size, p.numel()))
            std = np.where(comp == 0, CONVERGED_ZERO_STD, CONVERGED_STD)
            p.copy_(torch.from_numpy(mu[comp] + rng.normal(0, 1, p.numel()) * std).reshape(p.shape))


@pytest.mark.parametrize("mixture", ["fresh", "converged"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_retrain_epoch_vs_plain_epoch(benchmark, name, mixture):
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g))
    model = build_model(name)
    # The prior a `sws compress --model NAME` run starts from (its best settings).
    prior = default_prior(model, best_config(name).prior)
    if mixture == "converged":
        converge_(model, prior)
    start = copy.deepcopy((model.state_dict(), prior.state_dict()))
    cfg = RetrainConfig()
    sws_opt = make_optimizer(model, prior, cfg)
    plain_opt = adam(model.parameters(), lr=cfg.lr_weights)  # the optimizer pretraining uses
    gen = torch.Generator().manual_seed(0)

    hook = PriorGradient(prior, [p for _, p in compressible_parameters(model)])

    def plain():
        train_epoch(model, plain_opt, SplitBatches(data, cfg.batch_size, gen), progress=False)

    def sws():
        batches = SplitBatches(data, cfg.batch_size, gen)
        train_epoch(model, sws_opt, batches, after_backward=hook.new_epoch(cfg.tau / 60000), progress=False)

    sws()  # compile the prior kernel outside the timing
    plain_times = []

    def timed_plain_epoch():
        plain_times.append(best_of(plain, repeat=1))
        model.load_state_dict(start[0])  # every retraining epoch starts from the same state
        prior.load_state_dict(start[1])

    # A plain epoch before every timed retraining epoch, so that both see the same machine
    # state (this VM's speed drifts by 20-40% over seconds); best of five each.
    benchmark.pedantic(sws, setup=timed_plain_epoch, rounds=5, iterations=1)
    label = f"{name} retraining epoch, {mixture} mixture (prior included)"
    ratio = record(benchmark, label, benchmark.stats.stats.min, min(plain_times), "plain_epoch")
    benchmark.extra_info["cost_ratio"] = 1 / ratio
