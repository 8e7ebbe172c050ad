"""Training loops: plain pretraining and retraining under the mixture prior.

Data sets are whole tensors in memory (see :mod:`swsformat.retrain.data`), batches are
index slices of a shuffled permutation: no per-sample Python on two cores.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..errors import SwsBatchError, SwsCheckpointError, SwsTrainingError
from . import checkpoint as checkpoint_io
from .data import Split
from .fields import check_types
from .models import compressible_parameters
from .prior import MixturePrior, PriorConfig
from .ranks import set_epoch
from .shards import global_min_max, global_rms, is_sharded, local


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def adam(params, lr: float = 1e-3, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam, fused where torch has the fused kernel (CPU and CUDA).

    On two CPU cores the fused step of LeNet-300-100's 266K weights takes 0.16 ms against
    0.6-0.7 ms for the default (foreach) one, and a retraining step with the prior's three
    parameter groups 0.24 ms against 1.0 ms (best of 300).
    """
    params = list(params)
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    fused = bool(tensors) and all(t.device.type in ("cpu", "cuda") and t.is_floating_point() for t in tensors)
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# What training reads: an in-memory Split, or any re-iterable of (inputs, targets) batches,
# e.g. a torch.utils.data.DataLoader (which shuffles by itself).
Data = Split | Iterable[tuple[torch.Tensor, torch.Tensor]]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def evaluate(model: nn.Module, data: Data, batch_size: int = 2000) -> float:
    """Classification error in percent (argmax of the outputs against integer targets). Any
    other task (float targets, other shapes) is refused: pass your own ``evaluate_fn``."""
    was_training = model.training
    model.eval()
    # A sparsified model keeps its weights as buffers, so look at buffers too.
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    wrong = total = 0
    batches = (
        ((data.x[s : s + batch_size], data.y[s : s + batch_size]) for s in range(0, len(data), batch_size))
        if isinstance(data, Split) else data
    )
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        out = model(x)
        if y.is_floating_point() or y.is_complex() or y.dim() != 1 or out.dim() != 2 or out.shape[0] != y.shape[0]:
            model.train(was_training)
            raise SwsTrainingError(
                f"the default evaluation is classification error: it needs (N, classes) outputs and (N,) integer "
                f"targets, got outputs {tuple(out.shape)} and {y.dtype} targets {tuple(y.shape)}; pass "
                "evaluate_fn=your_metric (lower is better) for any other task")
        wrong += int((out.argmax(1) != y).sum())
        total += int(y.shape[0])
    model.train(was_training)
    if total == 0:
        raise SwsTrainingError("the test data holds no samples: there is no error to measure")
    return 100.0 * wrong / total


def batches_of(data: Data, batch_size: int, generator: torch.Generator) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``data``: a shuffled pass over a Split, or the iterable itself."""
    return SplitBatches(data, batch_size, generator) if isinstance(data, Split) else data


def steps_per_epoch(data: Data, batch_size: int) -> int:
    """Optimizer steps in one epoch of ``data`` (see :func:`batches_of`)."""
    if isinstance(data, Split):
        return -(-len(data) // batch_size)
    try:
        return len(data)
    except TypeError:
        raise SwsBatchError("the training batches must have a length (a DataLoader has one) to schedule the "
                        "learning rate") from None


@torch.no_grad()
def zero_pruned_(params: list[torch.Tensor], masks: list[torch.Tensor]) -> None:
    """Set the pruned entries (``mask`` False) of every parameter to exactly zero, in place."""
    for p, m in zip(params, masks):
        p.mul_(m)


def mask_grads_(params: list[torch.Tensor], masks: list[torch.Tensor]) -> float:
    """Zero the gradients of the pruned entries, so that the optimizer leaves them alone: an
    ``after_backward`` hook of :func:`train_epoch` (it adds nothing to the loss: 0.0)."""
    for p, m in zip(params, masks):
        if p.grad is not None:
            p.grad.mul_(m)
    return 0.0


def _check_pair(batch: object) -> None:
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise SwsBatchError(f"training batches must be (inputs, targets) pairs, got {type(batch).__name__}; map your "
                        "loader's batches to pairs and read them in loss_fn(model, inputs, targets)")


def check_batches(data: object, what: str) -> None:
    """Refuse a ``Dataset`` where batches belong: its items are single samples (a target with
    no batch dimension), which would train one sample per step and fail far later."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, (Split, torch.utils.data.DataLoader)):
        raise SwsBatchError(f"{what} is a {type(data).__name__}, whose items are single samples, not batches: pass "
                            f"torch.utils.data.DataLoader({what}, batch_size=...) (or a Split, or a list of (x, y) batches)")


def _samples_in(batch: object) -> int:
    """Samples in one ``(x, y)`` batch: the first dimension of its input."""
    _check_pair(batch)
    x = batch[0]
    if isinstance(x, dict) and x:
        x = next(iter(x.values()))
    if isinstance(x, torch.Tensor) and x.dim() > 0:
        return int(x.shape[0])
    raise SwsBatchError(
        f"cannot tell how many samples a training batch of type {type(batch).__name__} holds (expected (x, y) with a "
        "tensor x); set RetrainConfig.train_size (or SoftWeightSharing's dataset_size) to the number of training samples"
    )


def dataset_size(data: Data) -> int:
    """N in the prior's ``tau/N`` scaling: samples in a Split or a DataLoader's dataset, and
    for any other re-iterable of ``(x, y)`` batches (a list of batches, your own loader) the
    samples of one pass over it, counted by iterating it once (``len()`` of such an object
    counts batches, which made the prior's pull as many times too strong as a batch holds)."""
    if isinstance(data, Split):
        return len(data)
    if isinstance(data, torch.utils.data.DataLoader):
        # The sampler decides how many samples an epoch sees (a subset sampler fewer than the dataset).
        sampler = data.sampler
        if isinstance(sampler, torch.utils.data.DistributedSampler):
            # Each rank sees its share; together (DDP averages their gradients) they see the dataset.
            return len(sampler.dataset)  # type: ignore[arg-type]
        try:
            return len(sampler)  # type: ignore[arg-type]
        except TypeError:
            pass  # an iterable dataset: count its batches below
    if iter(data) is data:
        raise SwsBatchError(
            "the training data is an iterator, which one epoch would use up: pass a re-iterable (a list of batches, "
            "a DataLoader, a Split)"
        )
    n = sum(_samples_in(batch) for batch in data)
    if n == 0:
        raise SwsTrainingError("the training data holds no batches (or only empty ones)")
    return n


@dataclass
class EpochLog:
    epoch: int
    loss: float
    cross_entropy: float
    complexity: float
    test_error: float
    seconds: float
    tau: float = 0.0


class SplitBatches:
    """A shuffled pass over an in-memory :class:`Split` as ``(x, y)`` batches.

    The permutation is drawn when the object is made (so the generator advances exactly as
    one ``randperm`` per epoch); batches are index slices, not per-sample Python.
    """

    def __init__(self, split: Split, batch_size: int, generator: torch.Generator) -> None:
        self.split = split
        self.index = torch.randperm(len(split), generator=generator).split(batch_size)

    def __len__(self) -> int:
        return len(self.index)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for idx in self.index:
            yield self.split.x[idx], self.split.y[idx]


def cosine_schedule(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Every group's learning rate times ``(1 + cos(pi * s / steps)) / 2``: from 1 down to 0
    over ``steps`` calls of ``step()`` (epochs or batches, as the caller steps it)."""
    steps = max(steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default task loss: cross-entropy of the model's logits (class indices, or class
    probabilities as float targets)."""
    out = model(x)
    if y.is_floating_point() and (out.dim() < 2 or out.shape[1] < 2 or bool((y < 0).any())):
        raise SwsTrainingError(
            f"the default loss is cross-entropy over classes, but the targets are floats {tuple(y.shape)} that "
            f"cannot be class probabilities for outputs {tuple(out.shape)}: pass your own loss_fn(model, x, y), "
            "e.g. lambda m, x, y: torch.nn.functional.mse_loss(m(x), y)")
    return F.cross_entropy(out, y)


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = cross_entropy,
    before_forward: Callable[[], None] | None = None,
    after_backward: Callable[[], float] | None = None,
    after_step: Callable[[], None] | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    desc: str = "",
    progress: bool = True,
) -> tuple[float, float, float]:
    """One pass over ``batches``: the one training loop that pretraining, retraining under
    the prior, quantization-aware fine-tuning and codebook fine-tuning share.

    Per batch: ``before_forward()``, ``loss_fn(model, x, y)``, zero the grads, backward,
    ``after_backward()`` (returns a loss term it added as a gradient, e.g. the prior's
    complexity, which joins the reported loss), ``optimizer.step()``, ``scheduler.step()``
    when given (per-batch schedules), ``after_step()``.
    Returns the mean total loss, the mean task loss and the last ``after_backward`` value.
    """
    model.train()
    device = next(model.parameters()).device
    total = task_total = extra = 0.0
    n = 0
    for batch in tqdm(batches, desc=desc, leave=False, disable=not progress):
        _check_pair(batch)
        x, y = (t.to(device, non_blocking=True) if isinstance(t, torch.Tensor) else t for t in batch)
        if before_forward is not None:
            before_forward()
        loss = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        value = float(loss.detach())
        total += value
        task_total += value
        if after_backward is not None:
            extra = after_backward()
            total += extra
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step()
        n += 1
    n = max(n, 1)
    return total / n, task_total / n, extra


def pretrain(
    model: nn.Module,
    train: Data,
    test: Data,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    loss_fn: LossFn = cross_entropy,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
) -> list[EpochLog]:
    """Plain Adam training (PART 1 of the tutorial) with a cosine learning-rate decay per epoch.

    Returns one log entry per epoch. With ``checkpoint``, the state is saved atomically after
    every epoch and ``resume=True`` continues from it to the same weights as an uninterrupted
    run (pretraining is the longest step on a CPU: an hour on a loaded machine).
    """
    gen = torch.Generator().manual_seed(seed)
    opt = adam(model.parameters(), lr=lr)
    sched = cosine_schedule(opt, epochs)
    logs: list[EpochLog] = []
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    fp = checkpoint_io.fingerprint(
        {"pretrain": {"epochs": epochs, "lr": lr, "batch_size": batch_size}, "seed": seed, "shapes": shapes}
    )
    start = 1
    if resume and checkpoint is not None and os.path.exists(checkpoint):
        state = checkpoint_io.load(checkpoint, fp, map_location=next(model.parameters()).device)
        _restore(state, model, opt, sched, gen)
        logs = [EpochLog(**log) for log in state["logs"]]
        start = state["epoch"] + 1
    bar = tqdm(range(start, epochs + 1), desc="pretrain", initial=start - 1, total=epochs, disable=not progress)
    for epoch in bar:
        t0 = time.perf_counter()
        set_epoch(train, epoch)
        loss, ce, _ = train_epoch(
            model, opt, batches_of(train, batch_size, gen), loss_fn=loss_fn, desc=f"epoch {epoch}", progress=progress
        )
        sched.step()
        error = evaluate_fn(model) if evaluate_fn is not None else evaluate(model, test)
        logs.append(EpochLog(epoch, loss, ce, 0.0, error, time.perf_counter() - t0))
        bar.set_postfix(loss=f"{loss:.4f}", test_error=f"{logs[-1].test_error:.2f}%")
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, None, opt, sched, gen, epoch, logs, fp)
    return logs


def _restore(
    state: dict, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
    gen: torch.Generator, prior: MixturePrior | None = None,
) -> None:
    model.load_state_dict(state["model"])
    if prior is not None:
        prior.load_state_dict(state["prior"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])


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
        if self.train_size is not None and self.train_size < 1:
            raise ValueError(f"train_size must be >= 1 (or None: counted from the data), got {self.train_size}")
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


class PriorGradient:
    """An ``after_backward`` hook adding ``scale *`` the prior's complexity gradient to the
    weights' gradients in closed form (cheaper than autograd through the mixture)."""

    def __init__(self, prior: MixturePrior, weights: list[torch.Tensor], scale: float = 0.0) -> None:
        self.prior, self.weights, self.scale = prior, weights, scale
        self.complexity = 0.0

    def new_epoch(self, scale: float) -> PriorGradient:
        """Set the scale (tau/N) for the coming epoch and let the prior re-decide how it groups weights."""
        self.scale = scale
        self.prior.reset_grouping()
        return self

    def __call__(self) -> float:
        if self.scale <= 0:
            return 0.0
        self.complexity = self.prior.add_complexity_grad_(self.weights, self.scale)
        return self.scale * self.complexity


def make_optimizer(model: nn.Module, prior: MixturePrior, cfg: RetrainConfig) -> torch.optim.Adam:
    """Adam with one group for every network parameter (biases included) and three for the prior."""
    groups = [{"params": list(model.parameters()), "lr": cfg.lr_weights, "name": "network"}]
    groups += prior.param_groups(cfg.lr_means, cfg.lr_log_precisions, cfg.lr_mixing)
    return adam(groups)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, prior: MixturePrior | None, opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler, gen: torch.Generator, epoch: int, logs: list[EpochLog],
    settings: str,
) -> None:
    """Everything needed to continue a run, written atomically with a digest (see :mod:`.checkpoint`)."""
    from dataclasses import asdict

    state = {
        "epoch": epoch,
        "model": model.state_dict(),
        "prior": prior.state_dict() if prior is not None else None,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "logs": [asdict(log) for log in logs],
    }
    checkpoint_io.save(path, state, settings)


def run_fingerprint(model: nn.Module, cfg: RetrainConfig, seed: int, extra: object = None,
                    weights: list[nn.Parameter] | None = None) -> str:
    """Settings a checkpoint must share with the run that resumes it, including which weights
    are under the prior (another ``filter_fn`` would restore each mixture onto another tensor)."""
    from dataclasses import asdict

    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    out = {"retrain": asdict(cfg), "seed": seed, "shapes": shapes, "extra": extra}
    if weights is not None:
        first = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
        out["prior_weights"] = [first.get(id(p), "?") for p in weights]
    return checkpoint_io.fingerprint(out)


def retrain(
    model: nn.Module,
    prior: MixturePrior,
    train: Data,
    test: Data,
    cfg: RetrainConfig,
    seed: int = 0,
    on_epoch: Callable[[int, nn.Module, MixturePrior], None] | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    settings: object = None,
    loss_fn: LossFn = cross_entropy,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
    weights: list[nn.Parameter] | None = None,
    writer: bool = True,
) -> list[EpochLog]:
    """Retrain ``model`` with ``loss = task loss + tau/N * complexity`` (PART 2 of the tutorial).

    ``loss_fn(model, x, y)`` is the task loss (cross-entropy by default) and ``evaluate_fn(model)``
    the number logged per epoch (test error on ``test`` by default); ``weights`` are the
    parameters under the prior (default: :func:`compressible_parameters`).

    ``on_epoch`` is called after every epoch (plots). With ``checkpoint``, the full state is
    saved atomically after every epoch; ``resume=True`` continues from it, reaching the same
    weights as an uninterrupted run. ``settings`` (JSON-able) joins the fingerprint that a
    checkpoint must match; only a ``writer`` writes it (rank 0 under torchrun). Raises ``FloatingPointError`` when the loss stops being finite; the
    checkpoint then still holds the last good epoch. A corrupt checkpoint, one of other
    settings or one of a finished run raises :class:`SwsCheckpointError` and is kept.
    """
    weights = weights if weights is not None else [p for _, p in compressible_parameters(model)]
    fp = run_fingerprint(model, cfg, seed, settings, weights)
    n = cfg.train_size or dataset_size(train)
    gen = torch.Generator().manual_seed(seed)
    opt = make_optimizer(model, prior, cfg)
    # Cosine decay is optional: measured worse for the final snap on LeNet-300-100 (5.01% vs 3.66% error).
    sched = cosine_schedule(opt, cfg.epochs) if cfg.lr_schedule == "cosine" else torch.optim.lr_scheduler.LambdaLR(
        opt, lambda e: 1.0
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
        _restore(state, model, opt, sched, gen, prior)
        logs = [EpochLog(**log) for log in state["logs"]]
        start_epoch = state["epoch"] + 1
    hook = PriorGradient(prior, weights)
    bar = tqdm(range(start_epoch, cfg.epochs + 1), desc="retrain", disable=not progress)
    for epoch in bar:
        tau = cfg.tau_at(epoch)
        t0 = time.perf_counter()
        hook.new_epoch(tau / n)
        set_epoch(train, epoch)
        loss, ce, _ = train_epoch(
            model, opt, batches_of(train, cfg.batch_size, gen), loss_fn=loss_fn, after_backward=hook,
            desc=f"epoch {epoch}", progress=progress,
        )
        cx = hook.complexity
        if not (math.isfinite(loss) and math.isfinite(cx)):
            raise FloatingPointError(f"retraining diverged in epoch {epoch}: loss {loss}, complexity {cx}")
        sched.step()
        error = evaluate_fn(model) if evaluate_fn is not None else evaluate(model, test)
        logs.append(EpochLog(epoch, loss, ce, cx, error, time.perf_counter() - t0, tau))
        bar.set_postfix(loss=f"{loss:.4f}", test_error=f"{logs[-1].test_error:.2f}%", tau=f"{tau:.3g}")
        if checkpoint is not None and writer:  # under torchrun: once, by rank 0
            save_checkpoint(checkpoint, model, prior, opt, sched, gen, epoch, logs, fp)
        if on_epoch is not None:
            on_epoch(epoch, model, prior)
    return logs


def default_prior(model: nn.Module, config: PriorConfig, weights: list[nn.Parameter] | None = None) -> MixturePrior:
    """A prior initialised from the model's current (pretrained) weights (or ``weights``)."""
    weights = weights if weights is not None else [p for _, p in compressible_parameters(model)]
    device = local(weights[0]).device if weights else next(model.parameters()).device
    # The means only depend on the weights' range, the units on their RMS: both over every
    # rank's shards under FSDP.
    rms = global_rms(weights) if config.scale_to_weights else None
    if any(is_sharded(p) for p in weights):
        w = torch.tensor(global_min_max(weights), dtype=torch.float32)
    else:
        w = torch.cat([p.detach().flatten() for p in weights])
    return MixturePrior(w, config, weight_rms=rms).to(device)
