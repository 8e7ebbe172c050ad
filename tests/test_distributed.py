"""Soft weight-sharing under DistributedDataParallel: two CPU processes (gloo) reach the
weights and mixture of one process that sees the same global batches."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from swsformat import SoftWeightSharing
from swsformat.retrain import PriorConfig

STEPS, GLOBAL_BATCH = 30, 40


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(400, 20, generator=g), torch.randint(0, 4, (400,), generator=g)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))


def _train(model: nn.Module, sws: SoftWeightSharing, rank: int, world: int, wrapped: nn.Module) -> None:
    x, y = _data()
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *sws.param_groups(lr_means=1e-3)])
    order = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    for step in range(STEPS):
        batch = order[(step * GLOBAL_BATCH) % 400:][:GLOBAL_BATCH]
        local = batch.chunk(world)[rank]
        loss = F.cross_entropy(wrapped(x[local]), y[local])
        opt.zero_grad()
        loss.backward()  # DDP averages the task gradient over the ranks here
        sws.add_complexity_grad_()  # same weights and prior on every rank: the same term everywhere
        opt.step()


def _state(model: nn.Module, sws: SoftWeightSharing) -> dict[str, torch.Tensor]:
    return {**{f"model.{k}": v for k, v in model.state_dict().items()},
            **{f"prior.{k}": v for k, v in sws.state_dict().items()}}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    sws = SoftWeightSharing(model, PriorConfig(), dataset_size=400, tau=0.5)
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(model, sws, rank, world, ddp)
    torch.save(_state(model, sws), f"{out}.{rank}")
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_match_one(tmp_path):
    torch.set_num_threads(1)
    model = _model()
    sws = SoftWeightSharing(model, PriorConfig(), dataset_size=400, tau=0.5)
    _train(model, sws, 0, 1, model)
    single = _state(model, sws)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path / "state")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"state.{r}", weights_only=True) for r in range(2)]
    for name, want in single.items():
        assert torch.equal(ranks[0][name], ranks[1][name]), name  # the ranks never drift apart
        # Within float32 summation order: the gradient is averaged in another order.
        assert torch.allclose(ranks[0][name], want, rtol=1e-4, atol=1e-6), name
    assert not torch.equal(single["model.0.weight"], _model().state_dict()["0.weight"])
