"""Training loops: plain pretraining and retraining under the mixture prior.

Data sets are whole tensors in memory (see :mod:`swsformat.retrain.data`), batches are
index slices of a shuffled permutation: no per-sample Python on two cores.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import SwsCheckpointError
from . import checkpoint as checkpoint_io
from .data import Split
from .fields import check_types
from .models import compressible_parameters
from .prior import MixturePrior, PriorConfig


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def adam(params, lr: float = 1e-3) -> torch.optim.Adam:
    """Adam, fused where torch has the fused kernel (CPU and CUDA).

    On two CPU cores the fused step of LeNet-300-100's 266K weights takes 0.16 ms against
    0.6-0.7 ms for the default (foreach) one, and a retraining step with the prior's three
    parameter groups 0.24 ms against 1.0 ms (best of 300).
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    return torch.optim.Adam(params, lr=lr, fused=fused or None)


@torch.no_grad()
def evaluate(model: nn.Module, split: Split, batch_size: int = 2000) -> float:
    """Test error in percent."""
    was_training = model.training
    model.eval()
    # A sparsified model keeps its weights as buffers, so look at buffers too.
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    wrong = 0
    for s in range(0, len(split), batch_size):
        x = split.x[s : s + batch_size].to(device, non_blocking=True)
        y = split.y[s : s + batch_size].to(device, non_blocking=True)
        wrong += int((model(x).argmax(1) != y).sum())
    model.train(was_training)
    return 100.0 * wrong / max(len(split), 1)


def _batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    return list(torch.randperm(n, generator=generator).split(batch_size))


@dataclass
class EpochLog:
    epoch: int
    loss: float
    cross_entropy: float
    complexity: float
    test_error: float
    seconds: float
    tau: float = 0.0


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train: Split,
    batch_size: int,
    generator: torch.Generator,
    prior: MixturePrior | None = None,
    complexity_scale: float = 0.0,
    desc: str = "",
    progress: bool = True,
) -> tuple[float, float, float]:
    """One pass over ``train``; returns mean loss, mean cross-entropy, last complexity."""
    model.train()
    device = next(model.parameters()).device
    weights = [p for _, p in compressible_parameters(model)]
    total = ce_total = complexity = 0.0
    batches = _batches(len(train), batch_size, generator)
    if prior is not None:
        prior.reset_grouping()
    for idx in tqdm(batches, desc=desc, leave=False, disable=not progress):
        x, y = train.x[idx].to(device, non_blocking=True), train.y[idx].to(device, non_blocking=True)
        ce = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        ce.backward()
        ce_value = float(ce.detach())
        loss = ce_value
        if prior is not None and complexity_scale > 0:
            # The prior's gradient is added in closed form, not through autograd (it is cheaper).
            complexity = prior.add_complexity_grad_(weights, complexity_scale)
            loss += complexity_scale * complexity
        optimizer.step()
        total += loss
        ce_total += ce_value
    n = max(len(batches), 1)
    return total / n, ce_total / n, complexity


def pretrain(
    model: nn.Module,
    train: Split,
    test: Split,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
) -> list[EpochLog]:
    """Plain Adam training (PART 1 of the tutorial) with a cosine learning-rate decay.

    Returns one log entry per epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    opt = adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1))
    logs = []
    for epoch in tqdm(range(1, epochs + 1), desc="pretrain", disable=not progress):
        t0 = time.perf_counter()
        loss, ce, _ = train_epoch(model, opt, train, batch_size, gen, desc=f"epoch {epoch}", progress=progress)
        sched.step()
        logs.append(EpochLog(epoch, loss, ce, 0.0, evaluate(model, test), time.perf_counter() - t0))
    return logs


@dataclass(frozen=True)
class RetrainConfig:
    """Retraining settings with one learning rate per parameter group.

    The original tutorial used tau 0.003-0.005, weights 5e-4 and log-precisions 3e-3 for
    30+ epochs; on a CPU budget of 10-15 epochs the measured best is a larger tau (0.03-0.065
    per model in ``reproduce.BEST``, 0.05 here) and faster weights (1e-3) and log-precisions
    (1e-2), which make the mixture converge before the weights are snapped (see README,
    "Reproducing the paper").
    """

    epochs: int = 15
    batch_size: int = 256
    tau: float = 0.05
    tau_warmup_epochs: int = 0
    tau_final: float | None = None
    tau_ramp_epochs: int = 0
    lr_weights: float = 1e-3
    lr_means: float = 1e-4
    lr_log_precisions: float = 1e-2
    lr_mixing: float = 3e-3
    lr_schedule: str = "constant"
    train_size: int | None = None

    def __post_init__(self) -> None:
        check_types(self)
        if self.epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.tau < 0 or self.tau_warmup_epochs < 0:
            raise ValueError("tau and tau_warmup_epochs must be >= 0")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule must be 'cosine' or 'constant', got {self.lr_schedule!r}")
        for name in ("lr_weights", "lr_means", "lr_log_precisions", "lr_mixing"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    def tau_at(self, epoch: int) -> float:
        """tau for a 1-based epoch: ramped up from 0 over the warm-up epochs, then (with
        ``tau_final``) linearly to ``tau_final`` over the last ``tau_ramp_epochs`` epochs, which
        pulls the weights onto the means before they are snapped."""
        tau = self.tau
        if self.tau_warmup_epochs:
            tau *= min(1.0, epoch / self.tau_warmup_epochs)
        start = self.epochs - self.tau_ramp_epochs
        if self.tau_final is not None and self.tau_ramp_epochs and epoch > start:
            tau += (self.tau_final - tau) * (epoch - start) / self.tau_ramp_epochs
        return tau


def make_optimizer(model: nn.Module, prior: MixturePrior, cfg: RetrainConfig) -> torch.optim.Adam:
    """Adam with one group for every network parameter (biases included) and three for the prior."""
    groups = [{"params": list(model.parameters()), "lr": cfg.lr_weights, "name": "network"}]
    groups += prior.param_groups(cfg.lr_means, cfg.lr_log_precisions, cfg.lr_mixing)
    return adam(groups)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, prior: MixturePrior, opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, epoch: int, logs: list[EpochLog],
    settings: str,
) -> None:
    """Everything needed to continue a run, written atomically with a digest (see :mod:`.checkpoint`)."""
    from dataclasses import asdict

    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "prior": prior.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "logs": [asdict(log) for log in logs],
    }
    checkpoint_io.save(path, state, settings)


def run_fingerprint(model: nn.Module, cfg: RetrainConfig, seed: int, extra: object = None) -> str:
    """Settings a checkpoint must share with the run that resumes it."""
    from dataclasses import asdict

    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return checkpoint_io.fingerprint({"retrain": asdict(cfg), "seed": seed, "shapes": shapes, "extra": extra})


def retrain(
    model: nn.Module,
    prior: MixturePrior,
    train: Split,
    test: Split,
    cfg: RetrainConfig,
    seed: int = 0,
    on_epoch: Callable[[int, nn.Module, MixturePrior], None] | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    settings: object = None,
) -> list[EpochLog]:
    """Retrain ``model`` with ``loss = CE + tau/N * complexity`` (PART 2 of the tutorial).

    ``on_epoch`` is called after every epoch (plots). With ``checkpoint``, the full state is
    saved atomically after every epoch; ``resume=True`` continues from it, reaching the same
    weights as an uninterrupted run. ``settings`` (JSON-able) joins the fingerprint that a
    checkpoint must match. Raises ``FloatingPointError`` when the loss stops being finite; the
    checkpoint then still holds the last good epoch. A corrupt checkpoint, one of other
    settings or one of a finished run raises :class:`SwsCheckpointError` and is kept.
    """
    fp = run_fingerprint(model, cfg, seed, settings)
    n = cfg.train_size or len(train)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, prior, cfg)
    # Optional cosine decay (measured worse for the final snap on LeNet-300-100: 5.01% vs 3.66% error).
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 0.5 * (1 + math.cos(math.pi * e / max(cfg.epochs, 1))) if cfg.lr_schedule == "cosine" else 1.0
    )
    logs: list[EpochLog] = []
    start_epoch = 1
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = checkpoint_io.load(checkpoint, fp, map_location=next(model.parameters()).device)
        # Epoch == epochs: retraining had finished and a later step was interrupted, which
        # resumes from here. More epochs than the run has cannot come from the same settings.
        if not 0 <= state["epoch"] <= cfg.epochs:
            raise SwsCheckpointError(
                f"checkpoint {os.fsdecode(checkpoint)} holds epoch {state['epoch']} of a run of {cfg.epochs} epochs; "
                "it was kept. Resume with the settings that wrote it, or move it away to start afresh"
            )
        model.load_state_dict(state["model"])
        prior.load_state_dict(state["prior"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        logs = [EpochLog(**log) for log in state["logs"]]
        start_epoch = state["epoch"] + 1
    for epoch in tqdm(range(start_epoch, cfg.epochs + 1), desc="retrain", disable=not progress):
        tau = cfg.tau_at(epoch)
        t0 = time.perf_counter()
        loss, ce, cx = train_epoch(
            model, opt, train, cfg.batch_size, gen, prior, tau / n, desc=f"epoch {epoch}", progress=progress
        )
        if not (torch.isfinite(torch.tensor(loss)) and torch.isfinite(torch.tensor(cx))):
            raise FloatingPointError(f"retraining diverged in epoch {epoch}: loss {loss}, complexity {cx}")
        sched.step()
        logs.append(EpochLog(epoch, loss, ce, cx, evaluate(model, test), time.perf_counter() - t0, tau))
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, prior, opt, sched, gen, epoch, logs, fp)
        if on_epoch is not None:
            on_epoch(epoch, model, prior)
    return logs


def default_prior(model: nn.Module, config: PriorConfig) -> MixturePrior:
    """A prior initialised from the model's current (pretrained) weights."""
    device = next(model.parameters()).device
    w = torch.cat([p.detach().flatten() for _, p in compressible_parameters(model)])
    return MixturePrior(w, config).to(device)
