"""The whole soft weight-sharing job: retrain, merge, quantize, evaluate, encode."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..encoder import encode
from .data import Split
from .models import compressible_parameters
from .prior import Mixture, MixturePrior, PriorConfig, merge_components, quantize_weights
from .train import EpochLog, RetrainConfig, default_prior, evaluate, retrain


@dataclass(frozen=True)
class CompressConfig:
    """Everything :func:`compress` needs; the defaults are the best settings measured (see README)."""

    prior: PriorConfig = field(default_factory=PriorConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    merge_threshold: float = 1.0
    index_bits: int | str | None = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.merge_threshold < 0:
            raise ValueError("merge_threshold must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressResult:
    """What :func:`compress` measured; ``model`` holds the quantized weights."""

    model: nn.Module
    prior: MixturePrior
    mixture: Mixture
    logs: list[EpochLog]
    pretrained_error: float
    retrained_error: float
    quantized_error: float
    nonzero_fraction: float
    components_left: int
    merged: int
    seconds: float
    file_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "pretrained_error": self.pretrained_error,
            "retrained_error": self.retrained_error,
            "quantized_error": self.quantized_error,
            "nonzero_fraction": self.nonzero_fraction,
            "components_left": self.components_left,
            "merged": self.merged,
            "seconds": self.seconds,
            "file_bytes": self.file_bytes,
        }


@torch.no_grad()
def quantize_model_(model: nn.Module, mixture: Mixture) -> tuple[float, int]:
    """Snap the model's compressible weights in place; return (non-zero fraction, components used)."""
    params = [p for _, p in compressible_parameters(model)]
    new, counts = quantize_weights(params, mixture)
    for p, q in zip(params, new):
        p.copy_(q)
    total = sum(p.numel() for p in params)
    nonzero = sum(int(torch.count_nonzero(p)) for p in params)
    used = int(np.count_nonzero(counts[1:]))
    return nonzero / max(total, 1), used


def compress(
    model: nn.Module,
    train: Split,
    test: Split,
    config: CompressConfig = CompressConfig(),
    path: str | os.PathLike | None = None,
    metadata: dict[str, str] | None = None,
    on_epoch: Callable[[int, nn.Module, MixturePrior], None] | None = None,
    progress: bool = True,
) -> CompressResult:
    """Soft weight-sharing of a pretrained ``model``, written to ``path`` if given.

    Example:
        >>> result = swsformat.compress(model, train, test, path="lenet.sws")  # doctest: +SKIP
        >>> result.quantized_error, result.file_bytes  # doctest: +SKIP
    """
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    pre = evaluate(model, test)
    prior = default_prior(model, config.prior)
    logs = retrain(model, prior, train, test, config.retrain, seed=config.seed, on_epoch=on_epoch, progress=progress)
    retrained = evaluate(model, test)
    mixture, merged = merge_components(Mixture.from_prior(prior), config.merge_threshold)
    frac, used = quantize_model_(model, mixture)
    quant = evaluate(model, test)
    result = CompressResult(
        model, prior, mixture, logs, pre, retrained, quant, frac, used, merged, time.perf_counter() - t0
    )
    if path is not None:
        meta = {"sws.summary": json.dumps(result.summary()), "sws.config": json.dumps(config.to_dict())}
        meta.update(metadata or {})
        result.file_bytes = encode(model, path, index_bits=config.index_bits, metadata=meta)
    return result
