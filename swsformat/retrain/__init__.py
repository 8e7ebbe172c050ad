"""Soft weight-sharing retraining: prior, training loops, models, data, the whole pipeline.

This package knows nothing about the file layout: it hands quantized models to
:func:`swsformat.encode`.
"""

from __future__ import annotations

from . import data
from .method import SoftWeightSharing
from .models import MODELS, build_model
from .pipeline import CompressConfig, CompressResult, compress, distillation_loss
from .prior import MixturePrior, PriorConfig
from .train import RetrainConfig, evaluate, pretrain, retrain

__all__ = [
    "MODELS",
    "CompressConfig",
    "CompressResult",
    "MixturePrior",
    "PriorConfig",
    "RetrainConfig",
    "SoftWeightSharing",
    "build_model",
    "compress",
    "data",
    "distillation_loss",
    "evaluate",
    "pretrain",
    "retrain",
]
