"""Bayesian Compression with group normal-Jeffreys or group horseshoe priors (Louizos, Ullrich &
Welling, 2017).

Each selected layer gets a multiplicative scale ``z`` per group (an input unit of a linear
layer, an output filter of a convolution) with a log-uniform prior (normal-Jeffreys: Gaussian
posterior on ``z``) or a half-Cauchy one times a layer-wide half-Cauchy scale of width ``tau0``
(horseshoe: log-normal posteriors on its Gamma / inverse-Gamma factors), and weights
``w | z ~ N(z * theta, z^2 * sigma^2)``. Training maximises the variational lower bound
(task loss + KL / N) through the local reparameterisation trick; a group whose
``log alpha = log Var(z) - log E[z]^2`` ends above a threshold is noise and is pruned whole,
which removes units and filters, not single weights. The surviving weights are the posterior
means ``E[z] * theta``, rounded to a uniform grid whose step follows the posterior standard
deviation of each layer (the paper's bit-precision argument), then coded as a ``.sws`` file.

    bc = BayesianCompression(model, dataset_size=len(train_set))  # replaces the layers in place
    opt = torch.optim.Adam(bc.param_groups(lr=1e-3))                 # after: the parameters changed
    for x, y in loader:
        loss = task_loss(model(x), y) + bc.kl_loss()
        ...
    bc.finalize_()             # plain nn.Linear / nn.Conv2d again, pruned and rounded
    swsformat.encode(model, "model.sws", compress=bc.coded_names())
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import SwsTrainingError
from .fields import check_types
from .pipeline import (
    BIAS_DTYPES,
    _nonzero_fraction,
    _remove_dead,
    check_not_collapsed,
    check_split,
    finetune_codebook_,
    round_biases_,
    write_model,
)
from .train import (
    Data,
    LossFn,
    adam,
    batches_of,
    cosine_schedule,
    cross_entropy,
    evaluate,
    steps_per_epoch,
    train_epoch,
)

# Molchanov et al. (2017)'s fit of -KL(q || log-uniform) as a function of log alpha.
K1, K2, K3 = 0.63576, 1.87320, 1.48695
EPS = 1e-8
HALF_LOG_2PI_E = 0.5 * math.log(2 * math.pi * math.e)
LGAMMA_HALF = math.lgamma(0.5)


class JeffreysScales(nn.Module):
    """Group scales ``z`` under the normal-Jeffreys (log-uniform) prior, Gaussian posteriors."""

    def __init__(self, groups: int, init_logvar: float, like: torch.Tensor) -> None:
        super().__init__()
        # z starts at 1 (the pretrained function) with a small spread, as in the release.
        self.mu = nn.Parameter(1.0 + 0.01 * torch.randn(groups, device=like.device, dtype=like.dtype))
        self.logvar = nn.Parameter(torch.full((groups,), init_logvar, device=like.device, dtype=like.dtype))

    def mean(self) -> torch.Tensor:
        return self.mu

    def var(self) -> torch.Tensor:
        return self.logvar.exp()

    def sample(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Independent draws of every group's z, broadcast over ``shape`` (last axis: groups)."""
        return self.mu + torch.randn(shape, device=like.device, dtype=like.dtype) * (0.5 * self.logvar).exp()

    def log_alpha(self) -> torch.Tensor:
        return self.logvar - torch.log(self.mu.pow(2) + EPS)

    def log_parameters(self) -> list[nn.Parameter]:
        """The parameters on the log scale (trained at the log-variances' rate)."""
        return [self.logvar]

    def kl(self) -> torch.Tensor:
        la = self.log_alpha()
        return -(K1 * torch.sigmoid(K2 + K3 * la) - 0.5 * F.softplus(-la) - K1).sum()


def _kl_lognormal_gamma(mu: torch.Tensor, logvar: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(LogNormal(mu, exp(logvar)) || Gamma(shape 1/2, scale)), elementwise."""
    return (-mu - 0.5 * logvar - HALF_LOG_2PI_E + 0.5 * mu + (mu + 0.5 * logvar.exp()).exp() / scale
            + LGAMMA_HALF + 0.5 * math.log(scale))


def _kl_lognormal_invgamma(mu: torch.Tensor, logvar: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(LogNormal(mu, exp(logvar)) || InverseGamma(shape 1/2, scale)), elementwise."""
    return (-mu - 0.5 * logvar - HALF_LOG_2PI_E - 0.5 * math.log(scale) + LGAMMA_HALF + 1.5 * mu
            + scale * (-mu + 0.5 * logvar.exp()).exp())


class HorseshoeScales(nn.Module):
    """Group scales ``z_i = s * z~_i`` under the group horseshoe: ``z~_i ~ C+(0, 1)`` per group and a
    layer-wide ``s ~ C+(0, tau0)``, each half-Cauchy written as the square root of a Gamma(1/2)
    times an inverse Gamma(1/2) variable with log-normal posteriors (the paper's
    parameterisation, closed-form KLs). ``log z`` is then Gaussian: one draw per group."""

    def __init__(self, groups: int, init_logvar: float, like: torch.Tensor, tau0: float) -> None:
        super().__init__()
        kw = dict(device=like.device, dtype=like.dtype)
        # All four start at 1 (z = 1: the pretrained function); their KLs pull them from there.
        self.local_mu = nn.Parameter(0.01 * torch.randn(2, groups, **kw))
        self.local_logvar = nn.Parameter(torch.full((2, groups), init_logvar, **kw))
        self.global_mu = nn.Parameter(torch.zeros(2, **kw))
        self.global_logvar = nn.Parameter(torch.full((2,), init_logvar, **kw))
        self.tau0 = tau0

    def _log_z(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``log z`` per group."""
        m = 0.5 * (self.local_mu.sum(0) + self.global_mu.sum())
        v = 0.25 * (self.local_logvar.exp().sum(0) + self.global_logvar.exp().sum())
        return m, v

    def mean(self) -> torch.Tensor:
        m, v = self._log_z()
        return (m + 0.5 * v).exp()

    def var(self) -> torch.Tensor:
        m, v = self._log_z()
        return torch.expm1(v) * (2 * m + v).exp()

    def sample(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        m, v = self._log_z()
        return (m + v.sqrt() * torch.randn(shape, device=like.device, dtype=like.dtype)).exp()

    def log_alpha(self) -> torch.Tensor:
        """``log(Var z / E[z]^2) = log(exp(Var log z) - 1)``: large for a group whose scale the
        data left at its prior's breadth."""
        _, v = self._log_z()
        return torch.log(torch.expm1(v) + EPS)

    def log_parameters(self) -> list[nn.Parameter]:
        """Every parameter: all live on the log scale, where the log-variances' rate fits."""
        return [self.local_mu, self.local_logvar, self.global_mu, self.global_logvar]

    def kl(self) -> torch.Tensor:
        gm, gv = self.global_mu, self.global_logvar
        lm, lv = self.local_mu, self.local_logvar
        return (_kl_lognormal_gamma(gm[0], gv[0], self.tau0**2) + _kl_lognormal_invgamma(gm[1], gv[1], 1.0)
                + _kl_lognormal_gamma(lm[0], lv[0], 1.0).sum() + _kl_lognormal_invgamma(lm[1], lv[1], 1.0).sum())


class _GroupBayes(nn.Module):
    """Shared parts of the Bayesian layers: weights ``w | z ~ N(z theta, z^2 sigma^2)`` with a
    group scale ``z`` (``self.z``: normal-Jeffreys or horseshoe) and the KL terms."""

    weight_mu: nn.Parameter
    weight_logvar: nn.Parameter
    bias_mu: nn.Parameter | None
    bias_logvar: nn.Parameter | None
    z: JeffreysScales | HorseshoeScales

    def _init(self, weight: torch.Tensor, bias: torch.Tensor | None, groups: int, init_logvar: float,
              prior: str, tau0: float) -> None:
        self.weight_mu = nn.Parameter(weight.detach().clone())
        self.weight_logvar = nn.Parameter(torch.full_like(weight, init_logvar))
        self.bias_mu = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.bias_logvar = nn.Parameter(torch.full_like(bias, init_logvar)) if bias is not None else None
        if prior == "horseshoe":
            self.z = HorseshoeScales(groups, init_logvar, weight, tau0)
        else:
            self.z = JeffreysScales(groups, init_logvar, weight)

    def log_alpha(self) -> torch.Tensor:
        """Per group: log of the noise-to-signal ratio of ``z``; large means prunable."""
        return self.z.log_alpha()

    def kl(self) -> torch.Tensor:
        kl_w = 0.5 * (-self.weight_logvar + self.weight_logvar.exp() + self.weight_mu.pow(2) - 1).sum()
        if self.bias_mu is not None:
            kl_w = kl_w + 0.5 * (-self.bias_logvar + self.bias_logvar.exp() + self.bias_mu.pow(2) - 1).sum()
        return self.z.kl() + kl_w

    @torch.no_grad()
    def posterior(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """E[w], Var[w] (both shaped like the weight) and E[b] under the posterior."""
        z_mu, z_var = self.z.mean(), self.z.var()
        shape = self._group_shape()
        zm, zv = z_mu.view(shape), z_var.view(shape)
        w_var = self.weight_logvar.exp()
        mean = zm * self.weight_mu
        var = zm.pow(2) * w_var + zv * self.weight_mu.pow(2) + zv * w_var
        bias = None
        if self.bias_mu is not None:
            bias = self.bias_mu * z_mu if self._scales_bias else self.bias_mu.clone()
        return mean, var, bias

    def _group_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    _scales_bias = False


class GroupNJLinear(_GroupBayes):
    """``nn.Linear`` under a group prior (normal-Jeffreys, or ``prior="horseshoe"``), one group
    per input unit."""

    def __init__(self, layer: nn.Linear, init_logvar: float = -9.0, prior: str = "jeffreys",
                 tau0: float = 1e-5) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init(layer.weight, layer.bias, layer.in_features, init_logvar, prior, tau0)

    def _group_shape(self) -> tuple[int, ...]:
        return (1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return F.linear(x * self.z.mean(), self.weight_mu, self.bias_mu)
        xz = x * self.z.sample(x.shape, x)
        mu = F.linear(xz, self.weight_mu, self.bias_mu)
        var = F.linear(xz.pow(2), self.weight_logvar.exp(), None if self.bias_logvar is None else self.bias_logvar.exp())
        return mu + var.clamp_min(EPS).sqrt() * torch.randn_like(mu)


class GroupNJConv2d(_GroupBayes):
    """``nn.Conv2d`` under a group prior (normal-Jeffreys, or ``prior="horseshoe"``), one group
    per output filter."""

    _scales_bias = True

    def __init__(self, layer: nn.Conv2d, init_logvar: float = -9.0, prior: str = "jeffreys",
                 tau0: float = 1e-5) -> None:
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"Bayesian Compression takes zero-padded convolutions, got padding_mode={layer.padding_mode!r}")
        self.conv = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        self.out_channels = layer.out_channels
        self._init(layer.weight, layer.bias, layer.out_channels, init_logvar, prior, tau0)

    def _group_shape(self) -> tuple[int, ...]:
        return (-1, 1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = F.conv2d(x, self.weight_mu, self.bias_mu, **self.conv)
        if not self.training:
            return mu * self.z.mean().view(1, -1, 1, 1)
        z = self.z.sample((mu.shape[0], self.out_channels), mu).view(mu.shape[0], -1, 1, 1)
        bias_var = None if self.bias_logvar is None else self.bias_logvar.exp()
        var = F.conv2d(x.pow(2), self.weight_logvar.exp(), bias_var, **self.conv)
        return mu * z + (var * z.pow(2)).clamp_min(EPS).sqrt() * torch.randn_like(mu)


@dataclass
class BCFinalized:
    """What :meth:`BayesianCompression.finalize_` did, per layer (state_dict weight name)."""

    groups_kept: dict[str, tuple[int, int]]  # (kept, total)
    bits: dict[str, int]  # grid levels used: ceil(log2(levels))
    step: dict[str, float]  # the rounding grid's step
    nonzero_fraction: float


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    mod = model
    for p in path:
        mod = getattr(mod, p)
    return mod, leaf


class BayesianCompression:
    """Group normal-Jeffreys Bayesian Compression of ``model``'s ``nn.Linear`` and ``nn.Conv2d``
    layers (``filter_fn(name, module) -> bool`` chooses among them; default: all).

    The layers are replaced in place by their Bayesian twins initialised from the current
    (pretrained) weights, so build the optimizer afterwards. ``dataset_size`` is N: the KL
    term enters the loss divided by it. ``threshold`` is the log alpha above which a group is
    pruned (the release's LeNet values are -3 to -5; smaller prunes more).
    """

    def __init__(
        self, model: nn.Module, *, dataset_size: int, threshold: float = -3.0, init_logvar: float = -9.0,
        filter_fn=None, prior: str = "jeffreys", tau0: float = 1e-5,
    ) -> None:
        if isinstance(dataset_size, bool) or not isinstance(dataset_size, numbers.Integral) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive integer (training samples), got {dataset_size!r}")
        if not math.isfinite(threshold):
            raise ValueError(f"threshold must be finite, got {threshold!r}")
        if prior not in ("jeffreys", "horseshoe"):
            raise ValueError(f"prior must be 'jeffreys' (group normal-Jeffreys) or 'horseshoe', got {prior!r}")
        if not (math.isfinite(tau0) and tau0 > 0):
            raise ValueError(f"tau0 must be a positive number, got {tau0!r}")
        self.prior = prior
        self.model, self.dataset_size, self.threshold = model, int(dataset_size), float(threshold)
        keep = filter_fn or (lambda name, module: True)
        chosen = [(n, m) for n, m in model.named_modules()
                  if type(m) in (nn.Linear, nn.Conv2d) and keep(n, m)]
        if not chosen:
            raise ValueError("no nn.Linear or nn.Conv2d layer to compress (filter_fn chose none)")
        tied = {id(m.weight) for _, m in chosen}
        if len(tied) != len(chosen):
            raise ValueError("Bayesian Compression cannot keep tied weights tied; leave one of them out with filter_fn")
        self.layers: dict[str, _GroupBayes] = {}
        for name, layer in chosen:
            kind = GroupNJLinear if isinstance(layer, nn.Linear) else GroupNJConv2d
            twin = kind(layer, init_logvar, prior, tau0)
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, twin)
            self.layers[name] = twin

    def param_groups(self, lr: float = 1e-3, lr_logvar: float = 1e-2) -> list[dict[str, Any]]:
        """Every parameter of the model, the log-scale ones (log-variances; all of the horseshoe's
        scale parameters) in a group of their own: at the means' rate they need hundreds of
        epochs to move from their start to where groups prune."""
        logvars = [p for layer in self.layers.values()
                   for p in (*layer.z.log_parameters(), layer.weight_logvar, layer.bias_logvar) if p is not None]
        ids = {id(p) for p in logvars}
        rest = [p for p in self.model.parameters() if id(p) not in ids]
        return [{"params": rest, "lr": lr, "name": "network"}, {"params": logvars, "lr": lr_logvar, "name": "log_parameters"}]

    def kl_loss(self) -> torch.Tensor:
        """KL(q || prior) of every Bayesian layer divided by N: add it to the task loss."""
        return sum(layer.kl() for layer in self.layers.values()) / self.dataset_size

    @torch.no_grad()
    def log_alphas(self) -> dict[str, torch.Tensor]:
        return {n: layer.log_alpha().detach().clone() for n, layer in self.layers.items()}

    def coded_names(self) -> set[str]:
        """State_dict names of the weights to code (after :meth:`finalize_`)."""
        return {f"{n}.weight" for n in self.layers}

    @torch.no_grad()
    def finalize_(
        self, threshold: float | None = None, max_levels: int = 255,
        check: Callable[[nn.Module], float] | None = None, tolerance: float = 0.1, max_halvings: int = 8,
        round_values: bool = True,
    ) -> BCFinalized:
        """Prune the groups whose log alpha exceeds ``threshold``, round the posterior means of
        the rest to a per-layer grid and put plain ``nn.Linear`` / ``nn.Conv2d`` layers with
        those weights back into the model.

        The grid's step starts at the layer's mean posterior standard deviation (the paper's
        bit-precision argument; coarser if that needs more than ``max_levels`` values). With
        ``check(model) -> error`` (lower is better), layer by layer the step is halved (up to
        ``max_halvings`` times) until the error is within ``tolerance`` of the unrounded
        model's: a short training leaves posterior stds too wide to round to, and one coarse
        layer can cost several points of accuracy. ``round_values=False`` keeps the posterior
        means of the kept groups as they are (the structure alone, for another method to
        quantize; ``bits`` then reports the dtype's).
        """
        threshold = self.threshold if threshold is None else threshold
        kept_groups, bits, steps = {}, {}, {}
        plans = {}
        for name, layer in self.layers.items():
            keep = layer.log_alpha() < threshold
            if not bool(keep.any()):
                raise SwsTrainingError(
                    f"every group of {name} has log alpha >= {threshold}: finalizing would remove the layer (the model "
                    "is unchanged); raise the threshold or train with a smaller KL weight"
                )
            mean, var, bias = layer.posterior()
            mask = keep.view(layer._group_shape()).expand_as(mean)
            span = float(mean[mask].abs().max())
            finest = 2 * span / max(max_levels - 1, 1)
            step = max(float(var[mask].sqrt().mean()), finest)
            if bias is not None and layer._scales_bias:
                bias = bias * keep.to(bias.dtype) + 0.0  # a pruned filter outputs nothing, bias included
            plans[name] = (mean * mask, step, finest, bias)
            kept_groups[name] = (int(keep.sum()), int(keep.numel()))
        for name, (mean, _, _, bias) in plans.items():  # every layer checked first: all or nothing
            self._replace(name, mean, bias)
        target = None if check is None else check(self.model) + tolerance
        nonzero = total = 0
        for name, (mean, step, finest, _) in plans.items():
            weight = self.model.get_submodule(name).weight
            if not round_values:
                weight.copy_(mean + 0.0)
                bits[name], steps[name] = weight.element_size() * 8, 0.0
                nonzero += int(weight.count_nonzero())
                total += weight.numel()
                continue
            for halvings in range(max_halvings + 1):
                # + 0.0: a negative mean rounded (or masked) to zero is -0.0, which the encoder keeps
                # bit-exactly as a stored non-zero entry (it tripled a LeNet-300-100 file's entries).
                weight.copy_(torch.round(mean / step) * step + 0.0)
                if target is None or halvings == max_halvings or step / 2 < finest or check(self.model) <= target:
                    break
                step /= 2
            levels = int(torch.unique(weight[weight != 0]).numel())
            bits[name] = max(1, math.ceil(math.log2(levels + 1)))
            steps[name] = step
            nonzero += int(weight.count_nonzero())
            total += weight.numel()
        self.finalized = BCFinalized(kept_groups, bits, steps, nonzero / max(total, 1))
        return self.finalized

    def _replace(self, name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Put a plain layer with ``weight`` and ``bias`` where the Bayesian layer ``name`` is."""
        layer = self.layers[name]
        if isinstance(layer, GroupNJLinear):
            plain = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None)
        else:
            out, inp_g, *k = weight.shape
            plain = nn.Conv2d(inp_g * layer.conv["groups"], out, tuple(k), bias=bias is not None, **layer.conv)
        plain = plain.to(device=weight.device, dtype=weight.dtype)
        plain.weight.copy_(weight)
        if bias is not None:
            plain.bias.copy_(bias)
        parent, leaf = _parent(self.model, name)
        setattr(parent, leaf, plain)


@dataclass(frozen=True)
class BayesianCompressionConfig:
    """The group prior (``"jeffreys"`` or ``"horseshoe"`` with global scale ``tau0``), training of
    the Bayesian layers (Adam, cosine decay), the pruning threshold, and what
    follows: optional centroid fine-tuning of the rounded values (0 epochs: the paper's method),
    bias rounding and exact removal of units that cannot reach the output."""

    prior: str = "jeffreys"
    tau0: float = 1e-5
    epochs: int = 30
    lr: float = 1e-3
    lr_logvar: float = 1e-2
    batch_size: int = 128
    threshold: float = -3.0
    init_logvar: float = -9.0
    max_levels: int = 255
    rounding_tolerance: float | None = 0.1
    finetune_epochs: int = 0
    finetune_lr: float = 1e-4
    bias_dtype: str = "float16"
    bias_tolerance: float = 0.1
    remove_dead: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        if self.prior not in ("jeffreys", "horseshoe"):
            raise ValueError(f"prior must be 'jeffreys' or 'horseshoe', got {self.prior!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.finetune_epochs < 0:
            raise ValueError("epochs and batch_size must be >= 1, finetune_epochs >= 0")
        if not (self.lr > 0 and self.lr_logvar > 0 and self.finetune_lr > 0):
            raise ValueError("learning rates must be > 0")
        if not 2 <= self.max_levels <= 255:
            raise ValueError(f"max_levels must be in [2, 255], got {self.max_levels}")
        if self.bias_dtype not in BIAS_DTYPES:
            raise ValueError(f"bias_dtype must be one of {sorted(BIAS_DTYPES)}")
        if self.rounding_tolerance is not None and not self.rounding_tolerance >= 0:
            raise ValueError(f"rounding_tolerance must be None (the paper's grids) or >= 0, got {self.rounding_tolerance}")


@dataclass
class BayesianCompressionResult:
    model: nn.Module
    pretrained_error: float
    epoch_errors: list[dict[str, Any]]
    trained_error: float
    quantized_error: float
    nonzero_fraction: float
    groups_kept: dict[str, tuple[int, int]]
    bits: dict[str, int]
    dead_removed: int
    seconds: float
    file_bytes: int | None = None

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k != "model"}


def train_bayesian(
    model: nn.Module,
    train: Data,
    config: BayesianCompressionConfig,
    measure: Callable[[nn.Module], float],
    progress: bool = True,
    loss_fn: LossFn = cross_entropy,
    filter_fn=None,
    dataset_size: int | None = None,
) -> tuple[BayesianCompression, list[dict[str, Any]]]:
    """The Bayesian layers swapped into ``model`` and trained for ``config.epochs`` (Adam,
    cosine decay, task loss plus KL / N): the method object, to finalize, and per epoch the
    loss, ``measure(model)`` and the groups each layer would keep."""
    from .train import dataset_size as size_of

    torch.manual_seed(config.seed)
    bc = BayesianCompression(model, dataset_size=dataset_size or size_of(train), threshold=config.threshold,
                             init_logvar=config.init_logvar, filter_fn=filter_fn, prior=config.prior, tau0=config.tau0)
    opt = adam(bc.param_groups(config.lr, config.lr_logvar), lr=config.lr)
    sched = cosine_schedule(opt, config.epochs * steps_per_epoch(train, config.batch_size))
    gen = torch.Generator().manual_seed(config.seed)
    epochs = []
    for epoch in range(1, config.epochs + 1):
        loss, _, _ = train_epoch(model, opt, batches_of(train, config.batch_size, gen),
                                 loss_fn=lambda m, x, y: loss_fn(m, x, y) + bc.kl_loss(), scheduler=sched,
                                 desc=f"bayesian epoch {epoch}", progress=progress)
        kept = {n: int((la < config.threshold).sum()) for n, la in bc.log_alphas().items()}
        epochs.append({"epoch": epoch, "loss": loss, "test_error": measure(model), "groups_kept": kept})
    return bc, epochs


def bayesian_compress(
    model: nn.Module,
    train: Data,
    test: Data,
    config: BayesianCompressionConfig = BayesianCompressionConfig(),
    path: str | os.PathLike | None = None,
    metadata: dict[str, str] | None = None,
    progress: bool = True,
    loss_fn: LossFn = cross_entropy,
    evaluate_fn: Callable[[nn.Module], float] | None = None,
    filter_fn=None,
    dataset_size: int | None = None,
) -> BayesianCompressionResult:
    """Bayesian Compression (group normal-Jeffreys) of a pretrained ``model`` in place, written
    to ``path`` if given. Arguments as :func:`~swsformat.retrain.pipeline.compress`;
    ``dataset_size`` defaults to the training set's size."""
    from .train import dataset_size as size_of

    measure = evaluate_fn if evaluate_fn is not None else (lambda m: evaluate(m, test))
    t0 = time.perf_counter()
    pre = measure(model)
    bc, epochs = train_bayesian(model, train, config, measure, progress=progress, loss_fn=loss_fn, filter_fn=filter_fn,
                                dataset_size=dataset_size or size_of(train))
    trained = epochs[-1]["test_error"]
    check = evaluate_fn if evaluate_fn is not None else check_split(train, 10000)
    on_check = check if callable(check) else (lambda m: evaluate(m, check))
    done = bc.finalize_(max_levels=config.max_levels, check=None if config.rounding_tolerance is None else on_check,
                        tolerance=config.rounding_tolerance or 0.0)
    named = [(n, dict(model.named_parameters())[n]) for n in sorted(bc.coded_names())]
    finetune_codebook_(model, train, config.finetune_epochs, config.finetune_lr, config.batch_size, config.seed,
                       progress, loss_fn=loss_fn, weights=named)
    rounded = round_biases_(model, config.bias_dtype, check, config.bias_tolerance, named)
    quant = measure(model)
    check_not_collapsed(model, test if evaluate_fn is None else None, pre, quant, named,
                        advice="Raise the threshold (prune fewer groups) or train longer", measure=evaluate_fn)
    dead = _remove_dead(model, test if test is not None else train) if config.remove_dead else 0
    nonzero = _nonzero_fraction([p for _, p in named])
    result = BayesianCompressionResult(model, pre, epochs, trained, quant, nonzero, done.groups_kept, done.bits, dead,
                                       time.perf_counter() - t0)
    if path is not None:
        prior = {"jeffreys": "group normal-Jeffreys", "horseshoe": "group horseshoe"}[config.prior]
        method = {"method": "bayesian-compression", **asdict(config), "prior": prior}
        meta = {"sws.method": json.dumps(method), **(metadata or {})}
        result.file_bytes = write_model(model, path, bc.coded_names(), rounded, config.bias_dtype, meta, smallest=True)
    return result


__all__ = [
    "BCFinalized",
    "BayesianCompression",
    "BayesianCompressionConfig",
    "BayesianCompressionResult",
    "GroupNJConv2d",
    "GroupNJLinear",
    "bayesian_compress",
    "train_bayesian",
]
