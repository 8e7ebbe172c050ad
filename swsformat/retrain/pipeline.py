"""The whole soft weight-sharing job: retrain, merge, quantize, evaluate, encode."""

from __future__ import annotations

import copy
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from ..encoder import encode
from ..errors import SwsError, SwsTrainingError
from ..files import check_output
from .data import Split
from .fields import check_types
from .models import FilterFn, compressible_parameters, tied_names
from .prior import Mixture, MixturePrior, PriorConfig, PriorGroups
from .ranks import all_agree, from_writer, is_writer, set_epoch, sync_buffers, world, world_size
from .shards import count_over_shards, is_sharded, local, shard_groups, sum_over_shards
from .train import (
    Data,
    EpochLog,
    LossFn,
    RetrainConfig,
    adam,
    batches_of,
    check_batches,
    cosine_schedule,
    cross_entropy,
    dataset_size,
    evaluate,
    retrain,
    steps_per_epoch,
    train_epoch,
    zero_pruned_,
)

# The weights under the prior, by state_dict name; None means compressible_parameters(model).
Named = list[tuple[str, nn.Parameter]] | None
# One mixture for all weights under the prior, or one per weight tensor (per-group priors).
Mixtures = Mixture | Sequence[Mixture]

# Storage types for the biases of the coded layers (see :func:`round_biases_`).
BIAS_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class CompressConfig:
    """Everything :func:`compress` needs; the defaults are the best settings measured (see README)."""

    prior: PriorConfig = field(default_factory=PriorConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    merge_threshold: float = 1.0
    assign: str = "map"
    qat_epochs: int = 20
    qat_lr: float = 5e-4
    qat_distill: float = 0.0
    qat_temperature: float = 2.0
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4
    bias_clusters: int = 16
    bias_tolerance: float = 0.1
    bias_dtype: str = "float16"
    index_bits: int | str | None = "auto"
    remove_dead: bool = True
    prior_groups: str = "shared"
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if self.prior_groups not in ("shared", "layer"):
            raise ValueError(f"prior_groups must be 'shared' (one mixture) or 'layer' (one per weight tensor), "
                             f"got {self.prior_groups!r}")
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")
        if not (self.index_bits in (None, "auto") or (type(self.index_bits) is int and 1 <= self.index_bits <= 12)):
            raise ValueError(f"index_bits must be 'auto', None or an integer in [1, 12], got {self.index_bits!r}")
        if self.bias_tolerance < 0:
            raise ValueError("bias_tolerance must be >= 0")
        if self.merge_threshold < 0:
            raise ValueError("merge_threshold must be >= 0")
        if self.assign not in ("map", "nearest"):
            raise ValueError(f"assign must be 'map' or 'nearest', got {self.assign!r}")
        if not 0 <= self.bias_clusters <= 255:
            raise ValueError("bias_clusters must be in [0, 255] (0: no shared values for biases)")
        if self.bias_dtype not in BIAS_DTYPES:
            raise ValueError(f"bias_dtype must be one of {sorted(BIAS_DTYPES)}, got {self.bias_dtype!r}")
        if self.finetune_epochs < 0 or self.finetune_lr <= 0:
            raise ValueError("finetune_epochs must be >= 0 and finetune_lr > 0")
        if self.qat_epochs < 0 or self.qat_lr <= 0:
            raise ValueError("qat_epochs must be >= 0 and qat_lr > 0")
        if not 0 <= self.qat_distill <= 1 or self.qat_temperature <= 0:
            raise ValueError("qat_distill must be in [0, 1] and qat_temperature > 0")

    def to_dict(self, drop_added_defaults: bool = False) -> dict[str, Any]:
        """The settings as JSON-able data; with ``drop_added_defaults``, without the settings in
        ``ADDED_LATER`` that are at the value reproducing what runs before them did."""
        out = asdict(self)
        if drop_added_defaults:
            for key, value in ADDED_LATER.items():
                parent, leaf = settings_entry(out, key)
                if parent.get(leaf, object()) == value:
                    del parent[leaf]
        return out


def _cross_entropy_through(forward: nn.Module, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The default loss with the logits from ``forward`` (a DDP wrapper of ``model``)."""
    return F.cross_entropy(forward(x), y)


# Settings added after results and checkpoints were first written (dotted paths into
# ``to_dict()``), with the value that does what those runs did: records without them read
# as this value.
ADDED_LATER = {"prior_groups": "shared", "prior.scale_to_weights": False}


def settings_entry(settings: dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The dict holding the dotted ``key`` of a settings record, and the key's last part."""
    *path, leaf = key.split(".")
    for part in path:
        settings = settings[part]
    return settings, leaf


@dataclass
class CompressResult:
    """What :func:`compress` measured; ``model`` holds the quantized weights."""

    model: nn.Module
    prior: MixturePrior | PriorGroups
    mixture: Mixture | list[Mixture]  # one per weight tensor with prior_groups="layer"
    logs: list[EpochLog]
    pretrained_error: float
    retrained_error: float
    snapped_error: float
    quantized_error: float
    nonzero_fraction: float
    components_left: int
    merged: int
    seconds: float
    dead_removed: int = 0  # weights and biases zeroed by exact pruning (outputs bit-identical)
    file_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "pretrained_error": self.pretrained_error,
            "retrained_error": self.retrained_error,
            "snapped_error": self.snapped_error,
            "quantized_error": self.quantized_error,
            "nonzero_fraction": self.nonzero_fraction,
            "components_left": self.components_left,
            "merged": self.merged,
            "seconds": self.seconds,
            "file_bytes": self.file_bytes,
            "dead_removed": self.dead_removed,
        }


@torch.no_grad()
def prune_masks(
    model: nn.Module, mixture: Mixtures, rule: str = "map", weights: Named = None
) -> list[torch.Tensor]:
    """Boolean masks of the weights that survive: those ``rule`` does not give to the zero
    component (``mixture``: one for all weights or one per weight). For a weight sharded by
    FSDP the mask covers this rank's shard."""
    named = _named(model, weights)
    out = []
    for (_, p), mix in zip(named, per_weight(mixture, len(named))):
        part = local(p).detach()
        keep = mix.assign(part.cpu().double().numpy().ravel(), rule) != 0
        out.append(torch.from_numpy(keep).view(part.shape).to(part.device))
    return out


def per_weight(mixture: Mixtures, count: int) -> list[Mixture]:
    """``mixture`` repeated for ``count`` weights, or the given list of one per weight."""
    if isinstance(mixture, Mixture):
        return [mixture] * count
    mixtures = list(mixture)
    if len(mixtures) != count:
        raise ValueError(f"{len(mixtures)} mixtures for {count} weight tensors: give one, or one per weight")
    return mixtures


def _named(model: nn.Module, weights: Named) -> list[tuple[str, nn.Parameter]]:
    """The weights under the prior: ``weights`` if given, else :func:`compressible_parameters`."""
    return weights if weights is not None else compressible_parameters(model)


def check_split(data: Data, n: int = 10000) -> Split:
    """Up to ``n`` training samples in memory, for the bias checks (never the test set)."""
    if isinstance(data, Split):
        return data.subset(n)
    xs, ys, have = [], [], 0
    for x, y in data:
        xs.append(x)
        ys.append(y)
        have += int(y.shape[0])
        if have >= n:
            break
    return Split(torch.cat(xs)[:n], torch.cat(ys)[:n])


def _nonzero_grid(mixture: Mixture, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The sorted non-zero means and the midpoints between neighbours (for :func:`_nearest`)."""
    values = torch.tensor(np.sort(mixture.means[1:]), dtype=torch.float32, device=device)
    return values, (values[1:] + values[:-1]) / 2


def _grids(mixtures: list[Mixture], device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`_nonzero_grid` of each weight's mixture, made once per distinct mixture."""
    made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    return [made.setdefault(id(m), _nonzero_grid(m, device)) for m in mixtures]


def _nearest(w: torch.Tensor, values: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Each entry of ``w`` replaced by the nearest of the sorted ``values`` (``mids``: midpoints)."""
    return values[torch.bucketize(w, mids)]


@torch.no_grad()
def quantize_model_(
    model: nn.Module, mixture: Mixtures, masks: list[torch.Tensor], weights: Named = None
) -> tuple[float, int]:
    """Snap in place: pruned weights to exactly 0, the others to the nearest non-zero mean of
    their mixture (one for all weights or one per weight).

    Returns (non-zero fraction, number of distinct non-zero values used).
    """
    params = [p for _, p in _named(model, weights)]
    mixtures = per_weight(mixture, len(params))
    candidates = np.unique(np.concatenate([m.means[1:] for m in mixtures]).astype(np.float32))
    parts = []
    for p, m, (v, mids) in zip(params, masks, _grids(mixtures, local(params[0]).device)):
        part = local(p)
        q = torch.where(m, _nearest(part.detach().float(), v, mids), torch.zeros((), device=part.device))
        part.copy_(q.to(part.dtype))
        used = np.zeros(candidates.size)
        used[np.searchsorted(candidates, torch.unique(q[m]).cpu().numpy())] = 1.0
        parts.append((shard_groups(p), used))  # a sharded weight's values: over its shards
    return _nonzero_fraction(params), int((sum_over_shards(parts) > 0).sum())


def _nonzero_fraction(params: list[torch.Tensor]) -> float:
    kept = count_over_shards(params, [int(torch.count_nonzero(local(p))) for p in params])
    return sum(kept) / max(sum(p.numel() for p in params), 1)


def distillation_loss(
    teacher: nn.Module, weight: float, temperature: float = 2.0, forward: nn.Module | None = None,
) -> LossFn:
    """A ``loss_fn(model, x, y)``: ``(1 - weight) * CE + weight * T^2 * KL(teacher || student)``
    at temperature ``T`` (Hinton et al., 2015), plain cross-entropy at ``weight`` 0. Learning the
    pretrained net's soft outputs recovers more of what quantization costs than the labels alone
    (LeNet-5-Caffe, the tutorial net, the Fashion-MNIST ResNet). ``forward`` is the module called
    instead of ``model`` (a DDP wrapper of it)."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = (forward if forward is not None else model)(x)
        loss = F.cross_entropy(logits, y)
        if weight > 0:
            with torch.no_grad():
                soft = F.log_softmax(teacher(x) / temperature, dim=1)
            kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, log_target=True, reduction="batchmean")
            loss = (1 - weight) * loss + weight * temperature**2 * kl
        return loss

    return loss_fn


def quantization_aware_finetune_(
    model: nn.Module, mixture: Mixtures, masks: list[torch.Tensor], train: Data, epochs: int, lr: float,
    batch_size: int = 256, seed: int = 0, progress: bool = True,
    teacher: nn.Module | None = None, distill: float = 0.0, temperature: float = 2.0,
    loss_fn: LossFn = cross_entropy, weights: Named = None, forward: nn.Module | None = None,
) -> None:
    """Train with the pruned weights held at zero and every surviving weight quantized in the
    forward pass (nearest non-zero mean, straight-through gradient to the float weight).

    The retrained network is the best *float* network under the prior; this phase makes it the
    best *quantized* one for the pruning the prior chose, recovering what the snap costs
    (LeNet-300-100: 3.02% error with a plain snap, under 2% after 40-60 epochs of this; README,
    "Results").
    Adam with a cosine decay to zero, biases included; the mixture is not changed. With a
    ``teacher`` (the pretrained network) and ``distill`` > 0 the loss is
    ``(1 - distill) * CE + distill * T^2 * KL(teacher || student)`` at temperature ``T``
    (Hinton et al., 2015): the teacher's soft labels carry more than the hard ones. Any other
    ``loss_fn(model, x, y)`` replaces cross-entropy (without distillation). ``forward`` is the
    module the distillation loss calls instead of ``model`` (a DDP wrapper of it).
    """
    if epochs == 0:
        return
    if distill > 0 and teacher is not None and loss_fn is not cross_entropy:
        raise ValueError("distillation (qat_distill > 0) works with the default cross-entropy loss only")
    all_params = [p for _, p in _named(model, weights)]
    grids = _grids(per_weight(mixture, len(all_params)), local(all_params[0]).device)
    params = [local(p) for p in all_params]  # this rank's shards under FSDP: the updates are elementwise
    zero_pruned_(params, masks)
    opt = adam(model.parameters(), lr=lr)
    sched = cosine_schedule(opt, epochs * steps_per_epoch(train, batch_size))
    gen = torch.Generator().manual_seed(seed)
    shadow = [torch.empty_like(p) for p in params]

    @torch.no_grad()
    def quantize_forward() -> None:
        for p, m, s, (values, mids) in zip(params, masks, shadow, grids):
            s.copy_(p)
            p.copy_(_nearest(p, values, mids) * m)

    @torch.no_grad()
    def restore_float_weights() -> float:
        for p, full, m, s in zip(params, all_params, masks, shadow):
            p.copy_(s)
            if full.grad is not None:  # a frozen weight has none
                local(full.grad).mul_(m)
        return 0.0

    bar = tqdm(range(1, epochs + 1), desc="quantization-aware fine-tune", disable=not progress)
    for epoch in bar:
        set_epoch(train, epoch)
        loss, _, _ = train_epoch(
            model, opt, batches_of(train, batch_size, gen),
            loss_fn=distillation_loss(teacher, distill, temperature, forward) if teacher is not None else loss_fn,
            before_forward=quantize_forward,
            after_backward=restore_float_weights, after_step=lambda: zero_pruned_(params, masks), scheduler=sched,
            desc=f"epoch {epoch}", progress=progress,
        )
        bar.set_postfix(loss=f"{loss:.4f}")


def finetune_codebook_(
    model: nn.Module, train: Data, epochs: int, lr: float, batch_size: int = 256, seed: int = 0, progress: bool = True,
    loss_fn: LossFn = cross_entropy, weights: Named = None,
) -> None:
    """Train the shared values and the other parameters (biases) with the assignments frozen.

    After snapping, each weight is ``codebook[index]``; the gradient of a shared value is the
    sum of its weights' gradients (as in Deep Compression's centroid fine-tuning). Zeros stay
    exactly zero and no new value appears, so the file size does not change.
    """
    if epochs == 0:
        return
    weights = [p for _, p in _named(model, weights)]
    wset = {id(p) for p in weights}
    others = [p for p in model.parameters() if id(p) not in wset]
    values = torch.cat([p.detach().flatten() for p in weights])
    uniq, inverse = torch.unique(values, return_inverse=True)
    zero = int((uniq == 0).nonzero()[0]) if bool((uniq == 0).any()) else -1
    codebook = nn.Parameter(uniq.clone())
    sizes = [p.numel() for p in weights]
    opt = adam([codebook] + others, lr=lr)
    sched = cosine_schedule(opt, epochs * steps_per_epoch(train, batch_size))
    gen = torch.Generator().manual_seed(seed)

    def clear_weight_grads() -> None:
        for p in weights:
            p.grad = None

    def codebook_grad() -> float:
        grad = torch.cat([p.grad.flatten() for p in weights])
        codebook.grad = torch.zeros_like(codebook).index_add_(0, inverse, grad)
        if zero >= 0:
            codebook.grad[zero] = 0
        return 0.0

    @torch.no_grad()
    def write_weights() -> None:
        if zero >= 0:
            codebook[zero] = 0
        for p, chunk in zip(weights, codebook[inverse].split(sizes)):
            p.copy_(chunk.view_as(p))

    bar = tqdm(range(1, epochs + 1), desc="codebook fine-tune", disable=not progress)
    for epoch in bar:
        set_epoch(train, epoch)
        loss, _, _ = train_epoch(
            model, opt, batches_of(train, batch_size, gen), loss_fn=loss_fn, before_forward=clear_weight_grads,
            after_backward=codebook_grad, after_step=write_weights, scheduler=sched, desc=f"epoch {epoch}",
            progress=progress,
        )
        bar.set_postfix(loss=f"{loss:.4f}")
    clear_weight_grads()


def _coded_layer_biases(model: nn.Module, weights: Named = None) -> dict[str, nn.Parameter]:
    """The biases of the layers whose weights are coded (``x.weight`` -> ``x.bias``), by name."""
    params = dict(model.named_parameters())
    names = [n[: -len("weight")] + "bias" for n, _ in _named(model, weights) if n.endswith(".weight") or n == "weight"]
    return {n: params[n] for n in names if n in params}


@torch.no_grad()
def _change_if_cheap_(
    model: nn.Module, biases: dict[str, nn.Parameter], change: Callable[[torch.Tensor], torch.Tensor],
    check: Split | Callable[[nn.Module], float], tolerance: float, group: Any = None,
) -> list[str]:
    """Replace each bias ``b`` by ``change(b)`` in place; undo it all and return [] if the error
    on ``check`` (training data, never the test set; or a function of the model, lower is
    better) rises by more than ``tolerance``, else return the names."""
    if not biases:
        return []
    measure = check if callable(check) else (lambda m: evaluate(m, check))
    before = measure(model)
    saved = {n: b.detach().clone() for n, b in biases.items()}
    for b in biases.values():
        b.copy_(change(b))
    if not all_agree(measure(model) <= before + tolerance, group):  # under torchrun: every rank's data agrees
        for n, b in biases.items():
            b.copy_(saved[n])
        return []
    return list(biases)


@torch.no_grad()
def share_biases_(
    model: nn.Module, clusters: int, check: Split | Callable[[nn.Module], float], tolerance: float, weights: Named = None,
    group: Any = None,
) -> list[str]:
    """Quantize each layer's bias to ``clusters`` shared values (1-D k-means) if that costs at most
    ``tolerance`` points of error on ``check`` (training data, never the test set).

    Returns the names of the quantized biases (empty when the cost was too high and nothing changed).
    """
    from ..quantize import kmeans_1d, snap

    def shared(b: torch.Tensor) -> torch.Tensor:
        v = b.detach().cpu().double().numpy()
        return torch.from_numpy(snap(v, kmeans_1d(v, clusters))).to(b)

    return _change_if_cheap_(model, _coded_layer_biases(model, weights) if clusters else {}, shared, check, tolerance,
                             group)


@torch.no_grad()
def round_biases_(
    model: nn.Module, dtype: str, check: Split | Callable[[nn.Module], float], tolerance: float, weights: Named = None,
    group: Any = None,
) -> list[str]:
    """Round the biases of the coded layers to ``dtype`` in place if that costs at most
    ``tolerance`` points of error on ``check`` (training data) and every value stays finite;
    return their names, to be stored as ``dtype`` (raw, or coded with a ``dtype`` codebook
    after :func:`share_biases_`). In float32 the raw biases were 14% of a LeNet-300-100 file;
    in float16 none of the three committed nets changed its test error.
    """
    target = BIAS_DTYPES[dtype]
    biases = {n: b for n, b in _coded_layer_biases(model, weights).items() if b.dtype != target}
    if target == torch.float32 or not all(bool(torch.isfinite(b.to(target)).all()) for b in biases.values()):
        return []
    return _change_if_cheap_(model, biases, lambda b: b.to(target), check, tolerance, group)


def check_not_collapsed(
    model: nn.Module, test: Data | None, before: float, after: float, weights: Named = None,
    advice: str = "Lower the prior's pull (smaller retrain.tau), keep more weights (lower prior.pi_zero) or retrain "
    "longer (more epochs)",
    measure: Callable[[nn.Module], float] | None = None, outcome: str = "Nothing was written.", group: Any = None,
) -> None:
    """Refuse a result that lost a whole layer or fell most of the way to what the model
    scores with no weights at all (nothing is written).

    For a classification Split that level is chance. With ``measure`` (a user's metric, lower is
    better) it is measured: the coded weights are zeroed for one evaluation, then restored, so
    a regression net whose outputs went flat is caught as a classifier at chance is. Under
    ``group`` every rank refuses if one does (a metric of local data may differ by rank)."""
    # Every rank takes part in the vote (one rank's NaN must not leave the others waiting).
    if not all_agree(math.isfinite(before) and math.isfinite(after), group if measure is not None else None):
        raise SwsTrainingError(f"the metric is {before} before and {after} after compression (on this or another "
                               f"rank), so a collapse cannot be ruled out. {outcome} Check evaluate_fn: it must "
                               "return a finite number, lower is better")
    layers = _named(model, weights)
    empty = [n for n, p in layers if not bool(p.detach().any())]
    near_null, null, what_null = False, 0.0, ""
    if isinstance(test, Split):
        classes = max(int(test.y.unique().numel()), 2)
        null, what_null = 100.0 * (1 - 1 / classes), "chance"
    elif measure is not None and not empty:
        null, what_null = metric_without_weights(model, measure, layers), "the model's with every coded weight zero"
    if measure is not None and not isinstance(test, Split) and what_null and null < before:
        warnings.warn(f"the metric is lower with every coded weight zero ({null:.4g}) than for the model before "
                      f"compression ({before:.4g}): the collapse check reads evaluate_fn as lower-is-better; negate a "
                      "metric where higher is better (accuracy, R^2)", stacklevel=3)
    if what_null and null > before:
        # Chance level is 90% error for 10 classes; "near" it means most of the way from the
        # model's own error there.
        near_null = after >= before + 0.8 * (null - before)
    if what_null:
        near_null = not all_agree(not near_null, group)
    if not empty and not near_null:
        return
    kept = sum(int(p.detach().count_nonzero()) for _, p in layers)
    total = sum(p.numel() for _, p in layers)
    split = isinstance(test, Split)
    what = (f"layers {empty} lost every weight" if empty else
            f"test error {after:.2f}% is near chance ({null:.0f}%)" if split else
            f"the metric {after:.4g} is near {what_null} ({null:.4g})")
    numbers = (f"test error {before:.2f}% before and {after:.2f}% after" if split or measure is None else
               f"the metric {before:.4g} before and {after:.4g} after")
    raise SwsTrainingError(
        f"compression collapsed the model: {what}; {kept} of {total} weights non-zero ({100 * kept / max(total, 1):.3f}%), "
        f"{numbers}. {outcome} {advice}"
    )


@torch.no_grad()
def metric_without_weights(
    model: nn.Module, measure: Callable[[nn.Module], float], layers: list[tuple[str, nn.Parameter]],
) -> float:
    """``measure(model)`` with the weights of ``layers`` zeroed; they are restored after."""
    saved = [p.detach().clone() for _, p in layers]
    try:
        for _, p in layers:
            p.zero_()
        return float(measure(model))
    finally:
        for (_, p), s in zip(layers, saved):
            p.copy_(s)


def _remove_dead(model: nn.Module, data: Data, samples: int = 10000) -> int:
    """Zero the weights that cannot change the output (:mod:`swsformat.exact`), proven
    bit-identical on up to ``samples`` inputs of ``data``; 0 with a warning for a model
    torch.fx cannot trace."""
    from ..exact import remove_dead_units_verified_

    device = next(model.parameters()).device
    if isinstance(data, Split):
        inputs: torch.Tensor | list[torch.Tensor] = data.x[:samples].to(device)
    else:
        inputs, seen = [], 0
        for x, _ in data:
            inputs.append(x.to(device))
            seen += len(x)
            if seen >= samples:
                break
    try:
        removed = remove_dead_units_verified_(model, inputs)
    except SwsError as exc:
        warnings.warn(f"dead units left in place: {exc}", stacklevel=3)
        return 0
    return sum(removed.values())


def compress(
    model: nn.Module,
    train: Data,
    test: Data,
    config: CompressConfig = CompressConfig(),
    path: str | os.PathLike | None = None,
    metadata: dict[str, str] | None = None,
    on_epoch: Callable[[int, nn.Module, MixturePrior], None] | None = None,
    progress: bool = True,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    embed_summary: bool = False,
    loss_fn: LossFn = cross_entropy,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
    filter_fn: FilterFn | None = None,
    distributed: bool = False,
    forward: nn.Module | None = None,
) -> CompressResult:
    """Soft weight-sharing of a pretrained ``model``, written to ``path`` if given.

    ``train`` and ``test`` are in-memory :class:`Split` s or any re-iterable of ``(x, y)``
    batches (a ``torch.utils.data.DataLoader``: it shuffles and batches, ``batch_size`` in the
    config then only applies to Splits). ``loss_fn(model, x, y)`` is the task loss
    (cross-entropy by default); ``evaluate_fn(model)`` the number to report and guard, lower is
    better (classification error on ``test`` by default; it also decides whether biases may be
    rounded, so measure it on held-out training data for a clean test). ``filter_fn(name,
    module, param)`` chooses the weights under the prior (see
    :func:`~swsformat.retrain.models.default_filter`). A resumed run repeats an uninterrupted
    one bit for bit when its batches do: a shuffling ``DataLoader`` needs a ``generator`` (or
    sampler) whose state you restore too, else it starts its shuffle afresh.

    Under ``torchrun``, with ``distributed=True``: wrap the model in
    ``DistributedDataParallel``, pass the unwrapped ``model``, the wrapper as ``forward`` (the
    default loss and the distillation call it, so the gradients are averaged; a ``loss_fn`` of
    your own must call it itself), each rank's own batches (a ``DataLoader`` with a
    ``DistributedSampler``; its ``set_epoch`` is called every epoch) and the whole test set.
    Rank 0 alone writes the file and the checkpoint (put it on a file system every rank reads,
    to resume with the same number of processes, which is checked); its BatchNorm statistics
    are every rank's before each measurement. Without ``distributed`` each process runs on its own, as a single process.

    The file holds the weights, the architecture and ``metadata``; with ``embed_summary`` it
    also holds the measured errors and the whole config as JSON strings (about 0.9 KB, 8% of
    a LeNet-5-Caffe file, so by default they go to the caller, e.g. a JSON beside the file).

    Example:
        >>> result = swsformat.compress(model, train, test, path="lenet.sws")  # doctest: +SKIP
        >>> result.quantized_error, result.file_bytes  # doctest: +SKIP
    """
    from .method import SoftWeightSharing, merged_mixtures

    if config.qat_distill > 0 and config.qat_epochs > 0 and loss_fn is not cross_entropy:
        raise ValueError("qat_distill > 0 works with the default cross-entropy loss only; set qat_distill=0")
    check_batches(train, "train")
    check_batches(test, "test")
    group = world(distributed)
    if is_writer(group):  # before hours of training, not after
        for target in (path, checkpoint):
            if target is not None:
                check_output(target)
    if any(is_sharded(p) for p in model.parameters()):
        raise SwsTrainingError("compress() takes a whole model, not one sharded by FSDP: under FSDP use SoftWeightSharing in "
                         "your own loop (see the README), or wrap the model in DDP and pass distributed=True")
    if config.qat_distill > 0 and config.qat_epochs > 0 and group is not None and forward is None:
        raise ValueError("qat_distill > 0 under torchrun needs forward=your DDP wrapper (the distillation loss calls "
                         "it), or set qat_distill=0")
    if forward is not None and loss_fn is cross_entropy:
        loss_fn = partial(_cross_entropy_through, forward)
    measure = evaluate_fn if evaluate_fn is not None else (lambda m: evaluate(m, test))
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    pre = measure(model)
    teacher = copy.deepcopy(model).eval() if config.qat_distill > 0 and config.qat_epochs > 0 else None
    sws = SoftWeightSharing(model, config.prior, tau=config.retrain.tau, filter_fn=filter_fn,
                            dataset_size=config.retrain.train_size or dataset_size(train), groups=config.prior_groups)
    named, prior = sws.named_weights, sws.prior
    logs = retrain(
        model, prior, train, test, config.retrain, seed=config.seed, on_epoch=on_epoch, progress=progress,
        checkpoint=checkpoint, resume=resume, settings=_settings(config, world_size(group)), loss_fn=loss_fn,
        evaluate_fn=evaluate_fn, weights=sws.weights, writer=is_writer(group),
    )
    sync_buffers(model, group)
    retrained = measure(model)
    mixture, merged = merged_mixtures(prior, config.merge_threshold)
    masks = prune_masks(model, mixture, config.assign, named)
    quantization_aware_finetune_(
        model, mixture, masks, train, config.qat_epochs, config.qat_lr, config.retrain.batch_size, config.seed, progress,
        teacher=teacher, distill=config.qat_distill, temperature=config.qat_temperature,
        loss_fn=cross_entropy if teacher is not None else loss_fn, weights=named, forward=forward,
    )
    sync_buffers(model, group)
    frac, used = quantize_model_(model, mixture, masks, named)
    snapped = measure(model)
    finetune_codebook_(model, train, config.finetune_epochs, config.finetune_lr, config.retrain.batch_size,
                       config.seed, progress, loss_fn=loss_fn, weights=named)
    sync_buffers(model, group)
    check = evaluate_fn if evaluate_fn is not None else check_split(train, 10000)
    shared_biases = share_biases_(model, config.bias_clusters, check, config.bias_tolerance, named, group)
    rounded = round_biases_(model, config.bias_dtype, check, config.bias_tolerance, named, group)
    quant = measure(model)
    check_not_collapsed(model, test if evaluate_fn is None else None, pre, quant, named, measure=evaluate_fn,
                        group=group)
    # Under torchrun the proof must run on the same data everywhere: the test set, not each rank's batches.
    proof = test if test is not None else (train if group is None else None)
    dead = _remove_dead(model, proof) if config.remove_dead and proof is not None else 0
    if dead:
        frac = _nonzero_fraction([p for _, p in _named(model, named)])
    result = CompressResult(
        model, prior, mixture, logs, pre, retrained, snapped, quant, frac, used, merged, time.perf_counter() - t0,
        dead_removed=dead,
    )
    if path is None:
        return result
    failed = None
    if is_writer(group):  # under torchrun: rank 0 writes, the others learn the size (or its error)
        meta = dict(metadata or {})
        if embed_summary:
            meta.update({"sws.summary": json.dumps(result.summary()), "sws.config": json.dumps(config.to_dict())})
        coded = tied_names(model, sws.weights) | set(shared_biases)
        try:
            result.file_bytes = write_model(model, path, coded, rounded, config.bias_dtype, meta,
                                            index_bits=config.index_bits, smallest=True)
        except Exception as exc:  # re-raised below, after the other ranks heard of it
            failed = exc
    result.file_bytes = from_writer(result.file_bytes, failed, group)
    return result


def write_model(
    model: nn.Module, path: str | os.PathLike, coded: set[str], rounded: list[str], bias_dtype: str,
    metadata: dict[str, str], **options: Any,
) -> int:
    """Encode ``model`` as a method leaves it: the ``coded`` tensors through the codebook coders,
    the ``rounded`` biases stored as ``bias_dtype`` (exact: :func:`round_biases_` rounded them),
    its architecture if it has one; returns the file's size."""
    sd = model.state_dict()
    for n in rounded:
        sd[n] = sd[n].to(BIAS_DTYPES[bias_dtype])
    return encode(sd, path, compress=lambda n, t: n in coded, metadata=metadata,
                  architecture=getattr(model, "sws_architecture", None), **options)


def _settings(config: CompressConfig, ranks: int = 1) -> dict[str, Any]:
    """The config as a checkpoint's fingerprint sees it: settings added later are left out at
    the defaults that do what runs before them did, so their checkpoints still resume. The
    number of ranks joins it (above one): a run resumed on another count would go on with
    other batches per step."""
    settings = config.to_dict(drop_added_defaults=True)
    return settings if ranks == 1 else {**settings, "ranks": ranks}
