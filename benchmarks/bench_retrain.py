"""Cost of the prior: one retraining epoch against one plain training epoch of the same model."""

from __future__ import annotations

import pytest
import torch

from swsformat.retrain.data import Split
from swsformat.retrain.models import MODELS, build_model
from swsformat.retrain.prior import PriorConfig
from swsformat.retrain.train import RetrainConfig, adam, default_prior, make_optimizer, train_epoch

from .conftest import best_of, record

N = 10240


@pytest.mark.parametrize("name", sorted(MODELS))
def test_retrain_epoch_vs_plain_epoch(benchmark, name):
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(N, 1, 28, 28, generator=g), torch.randint(0, 10, (N,), generator=g))
    model = build_model(name)
    prior = default_prior(model, PriorConfig())
    cfg = RetrainConfig()
    sws_opt = make_optimizer(model, prior, cfg)
    plain_opt = adam(model.parameters(), lr=cfg.lr_weights)  # the optimizer pretraining uses
    gen = torch.Generator().manual_seed(0)

    def plain():
        train_epoch(model, plain_opt, data, cfg.batch_size, gen, progress=False)

    def sws():
        train_epoch(model, sws_opt, data, cfg.batch_size, gen, prior, cfg.tau / 60000, progress=False)

    sws()  # compile the prior kernel outside the timing
    plain_times = []

    def timed_plain_epoch():
        plain_times.append(best_of(plain, repeat=1))

    # A plain epoch before every timed retraining epoch, so that both see the same machine
    # state (this VM's speed drifts by 20-40% over seconds); best of five each.
    benchmark.pedantic(sws, setup=timed_plain_epoch, rounds=5, iterations=1)
    ratio = record(benchmark, f"{name} retraining epoch (prior included)", benchmark.stats.stats.min, min(plain_times), "plain_epoch")
    benchmark.extra_info["cost_ratio"] = 1 / ratio
