"""Bayesian Compression's structure, retrained and quantized again: the units a BC file kept, at full accuracy.

Thirty epochs of Bayesian Compression prune LeNet-5-Caffe to a few filters and units but leave
it at 1.57% error (group horseshoe), where the paper trains for about 200. This keeps the
structure a committed BC file found (its non-zero weights) and retrains only those weights,
the pruned ones held at exactly zero, with the pretrained net of ``sws compress --model M`` as
teacher (``distillation_loss``); ``--prune-within F`` also prunes a share ``F`` of every
layer's kept weights by magnitude in equal steps over the first half of the retraining (Deep
Compression's iterative pruning inside the structure). Then each layer is quantized to
``--clusters`` k-means values with a quantization-aware fine-tune (nearest value in the
forward pass, straight-through gradient), a centroid fine-tune, float16 biases and exact
removal of dead units, into
``results/methods/M-bc-retrained-PRIOR.sws`` and its JSON.

    python scripts/bc_retrain.py --model lenet5-caffe --source results/methods/lenet5-caffe-bayesian-compression-horseshoe.sws
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _method_run import ROOT, parser, run
from torch import nn

import swsformat
from swsformat.quantize import kmeans_1d
from swsformat.retrain.models import compressible_parameters
from swsformat.retrain.pipeline import (
    _remove_dead,
    check_not_collapsed,
    check_split,
    distillation_loss,
    finetune_codebook_,
    quantization_aware_finetune_,
    quantize_model_,
    round_biases_,
    write_model,
)
from swsformat.retrain.prior import Mixture
from swsformat.retrain.train import (
    adam,
    batches_of,
    cosine_schedule,
    evaluate,
    mask_grads_,
    steps_per_epoch,
    train_epoch,
    zero_pruned_,
)


@dataclass(frozen=True)
class Retrained:
    source: str
    retrain_epochs: int = 20
    prune_within: float = 0.0
    lr: float = 1e-3
    distill: float = 0.7
    temperature: float = 2.0
    clusters: int = 16
    qat_epochs: int = 10
    qat_lr: float = 5e-4
    finetune_epochs: int = 2
    finetune_lr: float = 1e-4
    batch_size: int = 128
    bias_dtype: str = "float16"
    bias_tolerance: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.clusters <= 255:
            raise SystemExit(f"--clusters must be in [1, 255] (a codebook's size), got {self.clusters}")
        if self.retrain_epochs < 0 or self.qat_epochs < 0 or self.finetune_epochs < 0:
            raise SystemExit("epochs must be >= 0")
        if not 0 <= self.prune_within < 1:
            raise SystemExit(f"--prune-within must be in [0, 1), got {self.prune_within}")
        if self.prune_within and not self.retrain_epochs:
            raise SystemExit("--prune-within prunes during retraining: it needs --retrain-epochs >= 1")


@dataclass
class RetrainedResult:
    prior: str
    source_error: float
    pretrained_error: float
    epoch_errors: list[float]
    retrained_error: float
    quantized_error: float
    nonzero_fraction: float
    values_per_layer: dict[str, int]
    dead_removed: int
    decoded_test_error: float | None = None

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def bc_prior(path: Path) -> str:
    """``"horseshoe"`` or ``"jeffreys"``: the prior of the Bayesian Compression run that wrote ``path``."""
    method = json.loads(swsformat.open(path).metadata().get("sws.method", "{}"))
    if method.get("method") != "bayesian-compression":
        raise SystemExit(f"{path}: not a Bayesian Compression file (its sws.method is {method.get('method')!r})")
    return "horseshoe" if "horseshoe" in method.get("prior", "") else "jeffreys"


def _structure(path: Path, model_name: str) -> nn.Module:
    """The BC file's model, trainable."""
    student = swsformat.load_model(path)
    held = getattr(student, "sws_architecture", {}).get("name")
    if held != model_name:
        raise SystemExit(f"{path}: holds {held!r}, not {model_name!r}")
    student.train()
    for p in student.parameters():
        p.requires_grad_(True)
    return student


@torch.no_grad()
def _prune_within(params: list[nn.Parameter], masks: list[torch.Tensor], structure: list[int],
                  fraction: float) -> list[torch.Tensor]:
    """Masks that prune ``fraction`` of each layer's structure (its ``structure`` weights at the
    start) by magnitude, the weights already pruned counted in: every layer keeps the same share.
    Exactly that many go, ties broken by position: a BC file's weights are rounded to a few
    levels, and cutting at a magnitude would take every weight that shares it."""
    out = []
    for p, m, k in zip(params, masks, structure):
        drop = int(round(fraction * k)) - (k - int(m.sum()))
        if drop > 0:
            flat = m.reshape(-1).clone()
            kept = flat.nonzero().squeeze(1)
            order = p.detach().reshape(-1)[kept].abs().argsort(stable=True)
            flat[kept[order[:drop]]] = False
            m = flat.reshape(m.shape)
        out.append(m)
    zero_pruned_(params, out)
    return out


def retrained(teacher: nn.Module, train, test, config: Retrained, path: Path, metadata: dict[str, str]) -> RetrainedResult:
    measure = lambda m: evaluate(m, test)  # noqa: E731
    torch.manual_seed(config.seed)
    teacher.eval()
    pre = measure(teacher)
    source = ROOT / config.source
    prior = bc_prior(source)
    student = _structure(source, teacher.sws_architecture["name"])
    start = measure(student)
    named = compressible_parameters(student)
    params = [p for _, p in named]
    masks = [p.detach() != 0 for p in params]
    loss_fn = distillation_loss(teacher, config.distill, config.temperature)

    def mask_grads() -> float:
        return mask_grads_(params, masks)  # the masks of this epoch (pruning within replaces them)

    def rezero() -> None:
        zero_pruned_(params, masks)

    opt = adam(student.parameters(), lr=config.lr)
    sched = cosine_schedule(opt, config.retrain_epochs * steps_per_epoch(train, config.batch_size))
    gen = torch.Generator().manual_seed(config.seed)
    errors = []
    ramp = max(1, config.retrain_epochs // 2)  # the first half prunes in equal steps, the second only retrains
    structure = [int(m.sum()) for m in masks]
    for epoch in range(1, config.retrain_epochs + 1):
        if config.prune_within and epoch <= ramp:
            masks = _prune_within(params, masks, structure, config.prune_within * epoch / ramp)
        train_epoch(student, opt, batches_of(train, config.batch_size, gen), loss_fn=loss_fn, after_backward=mask_grads,
                    after_step=rezero, scheduler=sched, desc=f"retrain epoch {epoch}")
        errors.append(measure(student))
    retrained_error = errors[-1] if errors else start
    mixtures = []
    for p, m in zip(params, masks):
        kept = p.detach()[m].double().numpy()
        centres = np.sort(kmeans_1d(kept, min(config.clusters, max(np.unique(kept).size, 1)), init="linear"))
        k = centres.size + 1
        mixtures.append(Mixture(np.concatenate([[0.0], centres]), np.ones(k), np.full(k, 1.0 / k)))
    quantization_aware_finetune_(student, mixtures, masks, train, config.qat_epochs, config.qat_lr, config.batch_size,
                                 config.seed, teacher=teacher, distill=config.distill,
                                 temperature=config.temperature, weights=named)
    nonzero, _ = quantize_model_(student, mixtures, masks, weights=named)
    finetune_codebook_(student, train, config.finetune_epochs, config.finetune_lr, config.batch_size, config.seed,
                       loss_fn=loss_fn, weights=named)
    rounded = round_biases_(student, config.bias_dtype, check_split(train, 10000), config.bias_tolerance, named)
    quant = measure(student)
    check_not_collapsed(student, test, pre, quant, named, advice="Retrain longer or use more clusters")
    dead = _remove_dead(student, test)
    values = {n: int(torch.unique(p.detach()[p != 0]).numel()) for n, p in named}
    method = {"method": "bc-retrained", "prior": prior}  # the config is in the JSON beside: 350 bytes of a 2 KB file
    write_model(student, path, {n for n, _ in named}, rounded, config.bias_dtype,
                {"sws.method": json.dumps(method), **metadata}, smallest=True)
    decoded = measure(swsformat.load_model(path))
    return RetrainedResult(prior, start, pre, errors, retrained_error, quant, nonzero, values, dead, decoded)


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--source", required=True, help="a Bayesian Compression .sws file of --model")
    for name in ("retrain_epochs", "clusters", "qat_epochs", "finetune_epochs"):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(Retrained, name))
    for name in ("prune_within", "lr", "distill", "qat_lr"):
        p.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(Retrained, name))
    a = p.parse_args(argv)
    source = Path(a.source).resolve()
    prior = bc_prior(source)
    config = Retrained(source=str(source.relative_to(ROOT)) if source.is_relative_to(ROOT) else str(source),
                       retrain_epochs=a.retrain_epochs, prune_within=a.prune_within,
                       lr=a.lr, distill=a.distill, clusters=a.clusters, qat_epochs=a.qat_epochs, qat_lr=a.qat_lr,
                       finetune_epochs=a.finetune_epochs, seed=a.seed)
    run("bc_retrain.py", f"bc-retrained-{prior}", a, config, retrained, argv)


if __name__ == "__main__":
    main()
