"""Deep Compression (Han, Mao & Dally, ICLR 2016) with retraining, into the same ``.sws`` files.

Iterative magnitude pruning, each step followed by retraining with the pruned weights held at
zero (L2 weight decay, as in the paper), then per-layer k-means weight sharing with linear
initialisation and centroid fine-tuning (the shared values trained with the assignments
frozen). Huffman coding of the result is what a ``.sws`` file does anyway. It uses the same
training loop, weight selection, bias rounding and collapse guard as soft weight-sharing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..quantize import kmeans_1d, magnitude_masks, snap
from .fields import check_types
from .models import FilterFn, compressible_parameters, tied_names
from .pipeline import BIAS_DTYPES, check_not_collapsed, check_split, finetune_codebook_, round_biases_, write_model
from .train import Data, LossFn, adam, batches_of, cross_entropy, evaluate, mask_grads_, train_epoch, zero_pruned_


@dataclass(frozen=True)
class DeepCompressionConfig:
    """Pruning schedule (fraction of the covered weights pruned after each step), retraining
    per step, k-means values per layer and centroid fine-tuning."""

    prune_schedule: tuple[float, ...] = (0.5, 0.75, 0.875, 0.94, 0.96)
    retrain_epochs: int = 3
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 256
    clusters: int = 32
    finetune_epochs: int = 3
    finetune_lr: float = 1e-4
    bias_dtype: str = "float16"
    bias_tolerance: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if not self.prune_schedule or any(not 0 <= p < 1 for p in self.prune_schedule):
            raise ValueError(f"prune_schedule must be fractions in [0, 1), got {self.prune_schedule}")
        if list(self.prune_schedule) != sorted(self.prune_schedule):
            raise ValueError("prune_schedule must not decrease: pruned weights stay pruned")
        if not 1 <= self.clusters <= 255:
            raise ValueError(f"clusters must be in [1, 255], got {self.clusters}")
        if self.retrain_epochs < 0 or self.finetune_epochs < 0 or self.batch_size < 1:
            raise ValueError("epochs must be >= 0 and batch_size >= 1")
        if self.bias_dtype not in BIAS_DTYPES:
            raise ValueError(f"bias_dtype must be one of {sorted(BIAS_DTYPES)}")


@dataclass
class DeepCompressionResult:
    model: nn.Module
    pretrained_error: float
    step_errors: list[dict[str, float]]
    quantized_error: float
    nonzero_fraction: float
    values_per_layer: dict[str, int]
    seconds: float
    file_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def _masked_training(
    model: nn.Module, params: list[nn.Parameter], masks: list[torch.Tensor], train: Data, epochs: int,
    cfg: DeepCompressionConfig, loss_fn: LossFn, gen: torch.Generator, progress: bool, desc: str,
) -> None:
    """Retrain with the pruned weights held at exactly zero (gradients masked, weights re-zeroed)."""
    opt = adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    for epoch in range(1, epochs + 1):
        train_epoch(model, opt, batches_of(train, cfg.batch_size, gen), loss_fn=loss_fn,
                    after_backward=lambda: mask_grads_(params, masks),
                    after_step=lambda: zero_pruned_(params, masks), desc=f"{desc} epoch {epoch}", progress=progress)


def deep_compress(
    model: nn.Module,
    train: Data,
    test: Data,
    config: DeepCompressionConfig = DeepCompressionConfig(),
    path: str | os.PathLike | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
    loss_fn: LossFn = cross_entropy,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
    filter_fn: FilterFn | None = None,
) -> DeepCompressionResult:
    """Deep Compression of a pretrained ``model`` in place, written to ``path`` if given.

    Arguments as :func:`~swsformat.retrain.pipeline.compress`.
    """
    measure = evaluate_fn if evaluate_fn is not None else (lambda m: evaluate(m, test))
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    named = compressible_parameters(model, filter_fn)
    if not named:
        raise ValueError("no weights to compress: the model has no layer filter_fn selects")
    params = [p for _, p in named]
    gen = torch.Generator().manual_seed(config.seed)
    pre = measure(model)
    steps: list[dict[str, float]] = []
    masks = [torch.ones_like(p, dtype=torch.bool) for p in params]
    for fraction in tqdm(config.prune_schedule, desc="prune and retrain", disable=not progress):
        values = {n: (p.detach() * m).cpu().double().numpy().ravel() for (n, p), m in zip(named, masks)}
        flat_masks, _ = magnitude_masks(values, fraction)
        masks = [torch.from_numpy(flat_masks[n]).view(p.shape).to(p.device) for n, p in named]
        zero_pruned_(params, masks)
        pruned = measure(model)
        _masked_training(model, params, masks, train, config.retrain_epochs, config, loss_fn, gen, progress,
                         f"pruned {fraction:.0%}")
        steps.append({"prune": fraction, "error_after_pruning": pruned, "error_after_retraining": measure(model)})
    values_per_layer = {}
    with torch.no_grad():
        for (n, p), m in zip(named, masks):
            kept = p.detach()[m].cpu().double().numpy()
            centres = kmeans_1d(kept, config.clusters, init="linear")
            q = torch.zeros_like(p)
            q[m] = torch.from_numpy(snap(kept, centres)).to(p)
            p.copy_(q)
            values_per_layer[n] = int(np.unique(q[m].cpu().numpy()).size)
    finetune_codebook_(model, train, config.finetune_epochs, config.finetune_lr, config.batch_size, config.seed,
                       progress, loss_fn=loss_fn, weights=named)
    check = evaluate_fn if evaluate_fn is not None else check_split(train, 10000)
    rounded = round_biases_(model, config.bias_dtype, check, config.bias_tolerance, named)
    quant = measure(model)
    check_not_collapsed(model, test if evaluate_fn is None else None, pre, quant, named,
                        advice="Prune less (a gentler prune_schedule) or retrain longer after each step (retrain_epochs)", measure=evaluate_fn)
    total = sum(p.numel() for p in params)
    nonzero = sum(int(p.count_nonzero()) for p in params)
    result = DeepCompressionResult(model, pre, steps, quant, nonzero / total, values_per_layer,
                                   time.perf_counter() - t0)
    if path is not None:
        meta = {"sws.method": json.dumps({"method": "deep-compression", **asdict(config)}), **(metadata or {})}
        result.file_bytes = write_model(model, path, tied_names(model, params), rounded, config.bias_dtype, meta)
    return result


__all__ = ["DeepCompressionConfig", "DeepCompressionResult", "deep_compress"]
