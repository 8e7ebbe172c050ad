"""Soft weight-sharing as an object you add to your own training loop.

    sws = swsformat.SoftWeightSharing(model, dataset_size=len(train_set))
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-3}, *sws.param_groups()])
    for x, y in loader:
        loss = task_loss(model(x), y)
        opt.zero_grad(); loss.backward()
        sws.add_complexity_grad_()          # or: (loss + sws.complexity_loss()).backward()
        opt.step()
    sws.finalize_()                         # merge, prune, snap every weight to a mixture mean
    swsformat.encode(model, "model.sws", compress=sws.coded_names())

:func:`~swsformat.retrain.pipeline.compress` is the same method driven by the library's
own loop, with quantization-aware and codebook fine-tuning after :meth:`finalize_`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import SwsConfigError, SwsTrainingError
from .models import FilterFn, compressible_parameters, tied_names
from .prior import REFERENCE_RMS, Mixture, MixturePrior, PriorConfig, PriorGroups, merge_components
from .shards import count_over_shards, global_rms, is_sharded
from .train import Data, LossFn, PriorGradient, cross_entropy, default_prior


@dataclass
class Finalized:
    """What :meth:`SoftWeightSharing.finalize_` did."""

    mixture: Mixture | list[Mixture]  # one per weight tensor (in ``named_weights`` order) with groups
    merged: int
    masks: list[torch.Tensor] = field(repr=False)
    nonzero_fraction: float
    values_used: int


class SoftWeightSharing:
    """A learned Gaussian-mixture prior over ``model``'s weights (Ullrich et al., 2017).

    ``dataset_size`` is N in the complexity term's ``tau / N`` scaling (the training set's
    size, not a batch's); ``tau`` trades accuracy for size (0.05 is the measured best on
    the MNIST nets; smaller keeps more weights). ``filter_fn(name, module, param)`` chooses
    the weights (default: linear, conv, embedding, RNN and attention weight matrices). The
    prior starts from the model's current weights, so make it after pretraining.

    ``groups`` gives weight tensors separate mixtures: ``None`` (one mixture for all, the
    paper's choice and the measured best on the MNIST nets), ``"layer"`` (one per weight
    tensor) or ``groups(name, param) -> key`` (one mixture per distinct key, e.g. embeddings
    apart from the rest). Under FSDP2 (``fully_shard``), build it on the sharded model: each
    rank works on its shards and the mixture's sums are all-reduced, so the mixture stays the
    same on every rank.
    """

    def __init__(
        self,
        model: nn.Module,
        prior: PriorConfig = PriorConfig(),
        *,
        dataset_size: int,
        tau: float = 0.05,
        filter_fn: FilterFn | None = None,
        groups: str | Callable[[str, nn.Parameter], str] | None = None,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
            raise SwsConfigError(f"dataset_size must be a positive integer (training samples), got {dataset_size!r}")
        if not (isinstance(tau, numbers.Real) and math.isfinite(tau) and tau >= 0):
            raise SwsConfigError(f"tau must be a finite number >= 0, got {tau!r}")
        dataset_size = int(dataset_size)
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise SwsConfigError(f"pass the module inside the {type(model).__name__} wrapper (wrapper.module): the prior "
                             "names weights as the model's state_dict does, which the wrapper prefixes with 'module.'")
        self.model = model
        self.named_weights = compressible_parameters(model, filter_fn)
        if not self.named_weights:
            raise SwsConfigError("no weights to put under the prior: the model has no layer filter_fn selects")
        self.weights = [p for _, p in self.named_weights]
        self._check_dtypes(SwsConfigError)
        if not prior.scale_to_weights:
            _warn_if_off_scale(self.weights)
        self.prior: MixturePrior | PriorGroups = make_prior(model, prior, self.named_weights, groups)
        self.tau, self.dataset_size, self.prior_config = tau, dataset_size, prior
        self._hook = PriorGradient(self.prior, self.weights)
        self._initial = [p.detach().clone() for p in self._prior_parameters()]
        self._steps = 0

    def _count_step(self) -> None:
        """Say early, not at finalize_, when the mixture does not learn (its groups are
        missing from the optimizer): after STILL_CHECK calls its parameters should have moved."""
        self._steps += 1
        if self._steps == STILL_CHECK and all(torch.equal(p.detach(), q)
                                              for p, q in zip(self._prior_parameters(), self._initial)):
            warnings.warn(f"after {STILL_CHECK} steps the mixture's parameters have not moved: add "
                          "*sws.param_groups() to your optimizer", stacklevel=3)

    def _prior_parameters(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups() for p in g["params"]]

    def _check_dtypes(self, error: type[Exception] = SwsTrainingError) -> None:
        """Called every step: a model cast after construction would reach the kernels."""
        if all(p.dtype in (torch.float32, torch.float64) for p in self.weights):
            return
        odd = sorted({str(p.dtype) for p in self.weights} - {"torch.float32", "torch.float64"})
        if odd:
            raise error(f"the prior's kernels take float32 or float64 weights, the model has {odd}: train in float32 "
                        "(mixed precision through torch.autocast keeps float32 weights), and cast the model (e.g. "
                        ".half()) only after finalize_()")

    @property
    def scale(self) -> float:
        """The complexity term's weight, ``tau / N``."""
        return self.tau / self.dataset_size

    def param_groups(
        self, lr_means: float = 1e-4, lr_log_precisions: float = 1e-2, lr_mixing: float = 3e-3
    ) -> list[dict[str, Any]]:
        """The prior's three optimizer groups, to add to yours (learning rates: the measured best)."""
        return self.prior.param_groups(lr_means, lr_log_precisions, lr_mixing)

    def complexity_loss(self) -> torch.Tensor:
        """``tau/N *`` the prior's negative log-likelihood of the weights plus its hyper-priors,
        to add to the task loss (autograd; any device). Not for FSDP-sharded weights: there the
        sums run over all ranks' shards, which :meth:`add_complexity_grad_` does."""
        if any(is_sharded(w) for w in self.weights):
            raise SwsTrainingError("complexity_loss() cannot see the other ranks' shards of an FSDP model: call "
                                   "sws.add_complexity_grad_() after loss.backward() instead")
        self._check_dtypes()
        self._count_step()
        return self.scale * self.prior.complexity(self.weights)

    def add_complexity_grad_(self) -> float:
        """After ``loss.backward()``: add the complexity term's gradient to the weights' and the
        prior's ``.grad`` in closed form (a fused kernel on CPU, cheaper than autograd).
        Returns the term's value."""
        self._check_dtypes()
        self._count_step()
        self._hook.scale = self.scale
        return self._hook()

    def new_epoch(self) -> None:
        """Let the CPU kernel re-decide how it groups weights by value (call once per epoch)."""
        self.prior.reset_grouping()

    @torch.no_grad()
    def finalize_(
        self, merge_threshold: float = 1.0, assign: str = "map",
        evaluate_fn: Callable[[nn.Module], float] | None = None,
    ) -> Finalized:
        """Merge close components, prune the weights the zero component claims (exactly 0.0)
        and snap every other weight to its nearest non-zero mean, in place.

        ``evaluate_fn(model)`` (your metric, lower is better; held-out data) guards the result:
        if it falls most of the way to what the model scores with these weights all zero, the
        weights are put back as they were and :class:`SwsTrainingError` says so (on every rank
        under torchrun, if one rank's metric says so). Without it only a layer that would lose
        every weight is refused."""
        import torch.distributed as dist

        from .pipeline import check_not_collapsed, prune_masks, quantize_model_
        from .ranks import world

        if hasattr(self, "masks"):
            raise SwsTrainingError("finalize_() was already called: the weights are pruned and snapped to the "
                                   "mixture's means; fine-tune with finetune_(), or encode the model")
        self._check_dtypes()
        if all(torch.equal(p.detach(), q) for p, q in zip(self._prior_parameters(), self._initial)):
            warnings.warn("the mixture's parameters are where they started: add *sws.param_groups() to your "
                          "optimizer (or load a trained prior with sws.load_state_dict) before finalize_()",
                          stacklevel=2)
        mixture, merged = merged_mixtures(self.prior, merge_threshold)
        masks = prune_masks(self.model, mixture, assign, self.named_weights)
        kept = count_over_shards(self.weights, [int(m.sum()) for m in masks])
        empty = [n for (n, _), k in zip(self.named_weights, kept) if k == 0]
        if empty:
            raise SwsTrainingError(
                f"finalizing would zero every weight of {empty} (the model is unchanged): train longer under the "
                "prior so that the mixture fits the weights, lower tau, or lower PriorConfig.pi_zero"
                + ("" if self.prior_config.scale_to_weights else
                   ", or use PriorConfig(scale_to_weights=True) if the weights are far from LeNet scale (RMS 0.05)")
                + (", give each layer its own mixture (groups='layer') if the layers' scales differ" if
                   isinstance(self.prior, MixturePrior) else "")
                + ("; finalize_(assign='nearest') prunes only the weights nearest the zero mean" if assign == "map"
                   else "")
            )
        before = None if evaluate_fn is None else float(evaluate_fn(self.model))
        saved = None if evaluate_fn is None else [p.detach().clone() for p in self.weights]
        fraction, used = quantize_model_(self.model, mixture, masks, self.named_weights)
        if evaluate_fn is not None:
            try:
                check_not_collapsed(self.model, None, before, float(evaluate_fn(self.model)), self.named_weights,
                                    measure=evaluate_fn, outcome="The weights are as they were before finalize_().",
                                    advice="Train longer under the prior, lower tau or lower PriorConfig.pi_zero",
                                    group=world(dist.is_available() and dist.is_initialized()))
            except SwsTrainingError:
                for p, s in zip(self.weights, saved):
                    p.copy_(s)
                raise
        self.mixture, self.masks = mixture, masks
        return Finalized(mixture, merged, masks, fraction, used)

    def finetune_(
        self, train: Data, *, epochs: int = 20, lr: float = 5e-4, loss_fn: LossFn = cross_entropy,
        batch_size: int = 256, seed: int = 0, progress: bool = True,
    ) -> None:
        """After :meth:`finalize_`: quantization-aware fine-tuning with your loss (pruned weights
        held at zero, the others quantized in the forward pass), then the final snap."""
        from .pipeline import quantization_aware_finetune_, quantize_model_

        if not hasattr(self, "masks"):
            raise SwsConfigError("call finalize_() before finetune_()")
        quantization_aware_finetune_(self.model, self.mixture, self.masks, train, epochs, lr, batch_size, seed,
                                     progress, loss_fn=loss_fn, weights=self.named_weights)
        quantize_model_(self.model, self.mixture, self.masks, self.named_weights)
        self._check_ranks_agree()

    @torch.no_grad()
    def _check_ranks_agree(self) -> None:
        """Under torchrun with whole (not sharded) weights: every rank must end with the same
        weights, which a ``loss_fn`` that calls the bare module instead of the DDP wrapper breaks
        (no gradient averaging) without any other sign."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        if any(is_sharded(w) for w in self.weights):
            return
        sums = torch.stack([torch.stack([w.double().sum(), (w.double() ** 2).sum()]) for w in self.weights]).flatten()
        sums = sums.to(self.weights[0].device)
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise SwsTrainingError("after finetune_ the processes hold different weights: the fine-tune's loss_fn must "
                                   "call the DistributedDataParallel wrapper (loss_fn=lambda m, x, y: loss(ddp(x), y)), "
                                   "so that the gradients are averaged")

    def coded_names(self) -> set[str]:
        """State_dict names of the weights under the prior, tied copies included: pass as
        ``encode(..., compress=sws.coded_names())`` to code exactly these."""
        return tied_names(self.model, self.weights)

    def state_dict(self) -> dict[str, Any]:
        """The prior's state, for your checkpoints."""
        return self.prior.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.prior.load_state_dict(state)
        self._initial = [p.detach().clone() for p in self._prior_parameters()]
        self._steps = 0


# Calls of the complexity term after which the mixture must have moved (the first call's
# optimizer step moves it, so this allows for optimizers that skip or warm up).
STILL_CHECK = 20


def _warn_if_off_scale(weights: list[torch.Tensor]) -> None:
    """Warn when absolute hyper-priors meet weights far from the scale they were written for."""
    rms = global_rms(weights)
    if not REFERENCE_RMS / 2 <= rms <= 2 * REFERENCE_RMS:
        warnings.warn(
            f"the weights under the prior have RMS {rms:.3g}; PriorConfig's stds and hyper-priors are weight values "
            f"written for RMS {REFERENCE_RMS} (LeNet scale): pass PriorConfig(scale_to_weights=True) to read them "
            "relative to each group's own weights (and groups='layer' if the layers' scales differ)", stacklevel=3)


def make_prior(
    model: nn.Module, config: PriorConfig, named: list[tuple[str, nn.Parameter]],
    groups: str | Callable[[str, nn.Parameter], str] | None,
) -> MixturePrior | PriorGroups:
    """One prior over all ``named`` weights, or one per group (see :class:`SoftWeightSharing`)."""
    weights = [p for _, p in named]
    if groups is None or groups == "shared":
        return default_prior(model, config, weights)
    if groups == "layer":
        keys = [n for n, _ in named]
    elif callable(groups):
        keys = [groups(n, p) for n, p in named]
        bad = [k for k in keys if not isinstance(k, str)]
        if bad:
            raise SwsConfigError(f"groups(name, param) must return a string key, got {bad[0]!r}")
    else:
        raise SwsConfigError(f"groups must be None, 'shared', 'layer' or a function (name, param) -> key, got {groups!r}")
    return PriorGroups.build(weights, keys, config, lambda cfg, ws: default_prior(model, cfg, ws))


def merged_mixtures(prior: MixturePrior | PriorGroups, threshold: float) -> tuple[Mixture | list[Mixture], int]:
    """The learned mixture(s) with redundant components merged: one for a single prior, else one
    per weight tensor (its group's); and the number of merges."""
    if isinstance(prior, MixturePrior):
        return merge_components(Mixture.from_prior(prior), threshold)
    done = [merge_components(Mixture.from_prior(p), threshold) for p in prior.priors]
    return [done[g][0] for g in prior.group_of()], sum(m for _, m in done)


__all__ = ["Finalized", "SoftWeightSharing"]
