"""Soft weight-sharing under DistributedDataParallel: two CPU processes (gloo) reach the
weights and mixture of one process that sees the same global batches."""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

import swsformat
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


def _leave() -> None:
    """End a spawned worker: both ranks leave the group together, then the process exits at
    once. gloo's threads can abort the interpreter's own teardown ("terminate called without
    an active exception", SIGABRT), seen in full CI runs after everything had passed."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = _model()
    sws = SoftWeightSharing(model, PriorConfig(), dataset_size=400, tau=0.5)
    ddp = nn.parallel.DistributedDataParallel(model)
    _train(model, sws, rank, world, ddp)
    torch.save(_state(model, sws), f"{out}.{rank}")
    sws._check_ranks_agree()  # what finetune_ checks at its end: the ranks agree here
    if rank == 1:  # as a fine-tune whose loss called the bare module would leave them
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-3
    with pytest.raises(swsformat.SwsTrainingError, match="different weights"):
        sws._check_ranks_agree()
    _leave()


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


def _shard(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _qat_batches(rank: int, world: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data()
    return [(x[s : s + GLOBAL_BATCH].chunk(world)[rank], y[s : s + GLOBAL_BATCH].chunk(world)[rank])
            for s in range(0, 400, GLOBAL_BATCH)]


def _full(model: nn.Module, sws: SoftWeightSharing) -> dict[str, torch.Tensor]:
    sd = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in model.state_dict().items()}
    return {**{f"model.{k}": v for k, v in sd.items()}, **{f"prior.{k}": v for k, v in sws.state_dict().items()}}


def _fsdp_job(rank: int, world: int, sharded: bool) -> tuple[nn.Module, SoftWeightSharing, float, int]:
    model = _model()
    if sharded:
        _shard(model)
    sws = SoftWeightSharing(model, PriorConfig(init_zero_std=0.05, pi_zero=0.9), dataset_size=400, tau=0.5)
    _train(model, sws, rank, world, model)
    done = sws.finalize_()
    sws.finetune_(_qat_batches(rank, world), epochs=1, progress=False)
    return model, sws, done.nonzero_fraction, done.values_used


def _fsdp_worker(rank: int, world: int, init: str, out: str, kernel: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from swsformat.retrain import prior as prior_module

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    if not kernel:  # the CUDA code path (autograd over local shards), run on CPU tensors
        prior_module.KERNEL_DEVICES = ()
    model, sws, fraction, used = _fsdp_job(rank, world, True)
    torch.save((_full(model, sws), fraction, used), f"{out}.{rank}")
    with pytest.raises(swsformat.SwsEncodeError, match="get_model_state_dict"):
        swsformat.encode(model, f"{out}.{rank}.sws")
    # The README's way: gather the whole state_dict on every rank, write it once on rank 0.
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        swsformat.encode(full, f"{out}.sws", compress=sws.coded_names())
    _leave()


@pytest.mark.slow
@pytest.mark.parametrize("kernel", [True, False], ids=["cpu-kernel", "autograd-path"])
def test_fsdp2_sharded_weights_match_one_process(tmp_path, kernel, monkeypatch):
    """FSDP2 (fully_shard): each rank trains, prunes, snaps and fine-tunes its shards; the
    mixture's sums go over both ranks, so the prior and the gathered weights equal one process's."""
    from swsformat.retrain import prior as prior_module

    torch.set_num_threads(1)
    if not kernel:
        monkeypatch.setattr(prior_module, "KERNEL_DEVICES", ())
    model, sws, fraction, used = _fsdp_job(0, 1, False)
    single = _full(model, sws)
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_fsdp_worker, args=(2, init, str(tmp_path / "state"), kernel), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"state.{r}", weights_only=True) for r in range(2)]
    for _, frac, values in ranks:
        assert frac == pytest.approx(fraction) and values == used
    for name, want in single.items():
        assert torch.equal(ranks[0][0][name], ranks[1][0][name]), name
        assert torch.allclose(ranks[0][0][name], want, rtol=1e-4, atol=1e-6), name
    assert 0 < fraction < 1
    assert not (tmp_path / "state.0.sws").exists() and not (tmp_path / "state.1.sws").exists()
    decoded = swsformat.load_state_dict(tmp_path / "state.sws")
    for name, t in decoded.items():
        assert torch.equal(t, ranks[0][0][f"model.{name}"]), name


def _compress_job(rank: int, world: int, folder: str, resume: bool = False, bn: bool = False) -> dict[str, float]:
    from swsformat.retrain import CompressConfig, RetrainConfig
    from swsformat.retrain.data import Split

    x, _ = _data()
    y = (x @ torch.randn(20, 4, generator=torch.Generator().manual_seed(2))).argmax(1)  # learnable labels
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(32) if bn else nn.Identity()  # DDP syncs its statistics only at the next forward
    model = nn.Sequential(nn.Linear(20, 32), norm, nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(100):  # pretrain: the same on every rank (same data, seed, one thread)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    order = torch.randperm(400, generator=torch.Generator().manual_seed(1))
    batches = [(x[b.chunk(world)[rank]], y[b.chunk(world)[rank]]) for b in order.split(GLOBAL_BATCH)]
    cfg = CompressConfig(prior=PriorConfig(init_zero_std=0.05, pi_zero=0.9),
                         retrain=RetrainConfig(epochs=3, tau=0.5, train_size=400), qat_epochs=1, finetune_epochs=1)
    result = swsformat.compress(
        model, batches, Split(x, y), cfg, path=f"{folder}/m.sws", checkpoint=f"{folder}/run.ckpt", resume=resume,
        loss_fn=lambda m, xb, yb: F.cross_entropy(wrapped(xb), yb), progress=False, distributed=world > 1,
    )
    return {"error": result.quantized_error, "bytes": result.file_bytes, "nonzero": result.nonzero_fraction,
            "state": {k: v.clone() for k, v in model.state_dict().items()}}


def _compress_worker(rank: int, world: int, init: str, folder: str, resume: bool, bn: bool) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.save(_compress_job(rank, world, folder, resume, bn), f"{folder}/summary.{rank}")
    _leave()


@pytest.mark.slow
def test_compress_under_two_gloo_processes(tmp_path):
    """compress(distributed=True) under DDP (the user's loss calls the wrapper): rank 0 alone
    writes the file and the checkpoint, every rank returns the same numbers, the weights equal
    one process's within float summation order, a resumed run writes the same file; with
    BatchNorm (statistics of each rank's own batches) the ranks still agree."""
    torch.set_num_threads(1)
    for folder in ("one", "two", "bn"):
        (tmp_path / folder).mkdir()
    single = _compress_job(0, 1, str(tmp_path / "one"))
    spawn = lambda folder, resume, bn=False: mp.spawn(  # noqa: E731
        _compress_worker, args=(2, f"file://{tmp_path / folder}-{resume}-rdv", str(tmp_path / folder), resume, bn),
        nprocs=2)
    spawn("two", False)
    ranks = [torch.load(tmp_path / "two" / f"summary.{r}", weights_only=True) for r in range(2)]
    assert _same(ranks[0], ranks[1]) and ranks[0]["bytes"] == (tmp_path / "two" / "m.sws").stat().st_size
    assert (tmp_path / "two" / "run.ckpt").exists()
    one = swsformat.load_state_dict(tmp_path / "one" / "m.sws")
    two = swsformat.load_state_dict(tmp_path / "two" / "m.sws")
    for name, want in one.items():
        assert torch.allclose(two[name].float(), want.float(), rtol=1e-3, atol=1e-5), name
    assert ranks[0]["error"] == pytest.approx(single["error"])
    written = (tmp_path / "two" / "m.sws").read_bytes()
    spawn("two", True)  # every epoch is in the checkpoint: resumes after retraining, same file
    assert (tmp_path / "two" / "m.sws").read_bytes() == written
    spawn("bn", False, True)
    ranks = [torch.load(tmp_path / "bn" / f"summary.{r}", weights_only=True) for r in range(2)]
    assert _same(ranks[0], ranks[1])


def _same(a: dict, b: dict) -> bool:
    """Equal summaries, the model states bit for bit (BatchNorm statistics included)."""
    sa, sb = a.pop("state"), b.pop("state")
    return a == b and sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
