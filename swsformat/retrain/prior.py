"""The learned Gaussian-mixture prior of soft weight-sharing (Ullrich, Meeds & Welling, 2017).

``p(w) = prod_i sum_j pi_j N(w_i | mu_j, 1/lambda_j)`` with a zero component (``mu_0 = 0``,
``pi_0`` fixed or under a Beta hyper-prior), learned means, log-precisions under Gamma
hyper-priors and mixing logits. The negative log-probability of all weights and all of
its gradients come from one fused numba pass per weight tensor on CPU (chunked torch
expressions on CUDA). :meth:`MixturePrior.complexity` is the autograd entry point; the
training loop uses :meth:`MixturePrior.add_complexity_grad_`, which adds the same gradient
into ``.grad`` in place, without an autograd graph.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np
import torch
from torch import nn

from ..errors import SwsConfigError
from ._prior_kernel import (
    F32_LOGIT_LIMIT,
    TABLE_MAX_POINTS,
    TABLE_POINTS_PER_STD,
    TABLE_TOLERANCE,
    mixture_param_grads,
    mixture_params,
    nll_and_grads,
    nll_and_grads_f32,
    table_gradients,
    table_pass,
    table_range,
    table_sums,
    value_order,
)
from .fields import check_types
from .shards import is_sharded, local, shard_groups, sum_over_shards

LOG_2PI = math.log(2.0 * math.pi)
# The weight RMS for which PriorConfig's numbers are written: the pretrained LeNet-300-100 the
# tutorial's settings were tuned on has 0.049 (LeNet-5-Caffe 0.038). With
# ``scale_to_weights`` every group's hyper-priors and starting stds are rescaled by its own
# RMS over this one.
REFERENCE_RMS = 0.05
CHUNK = 1 << 20
# The training path re-groups each weight tensor by value every REGROUP_EVERY steps and uses
# the grouping while it pays, that is while it leaves the kernel less than PAYS_BELOW of the
# (weight, component) pairs; otherwise (a fresh, wide mixture: every component reaches every
# weight) it runs in natural order until the next try. Once a LeNet-300-100 mixture has
# narrowed, the share of pairs left (26%) does not grow within 16 steps, so a grouping goes
# stale slowly; re-grouping costs about one kernel call.
REGROUP_EVERY = 64
PAYS_BELOW = 0.5
# On the training path, a call whose float32 weights total at least TABLE_MIN takes the table
# (see _prior_kernel) for each of its float32 tensors of at least TABLE_MIN_TENSOR weights: one
# light pass per weight whatever the mixture, over one grid built once per call for all of
# them (building it costs as much as a pass over ~1M weights). Its gradients are within about
# 1e-4 of the largest one (tested). The MNIST nets (under 1M weights) keep the exact kernel,
# whose cost per weight is comparable there.
TABLE_MIN = 1 << 20
TABLE_MIN_TENSOR = 1 << 16
TABLE_MARGIN = 0.05
# Devices whose tensors take the numba kernels; others (CUDA) take the chunked torch
# expressions. Tests empty it to run the GPU code path on CPU tensors.
KERNEL_DEVICES: tuple[str, ...] = ("cpu",)
_NATURAL = np.empty(0, np.int32)


@contextmanager
def kernel_threads() -> Iterator[None]:
    """Run the numba kernels on as many threads as torch uses. numba's default is one thread
    per core in every process, so under torchrun (one torch thread per process) two processes
    would run four threads on two cores (with the thread-count reset fixed in
    ``swsformat._start_numba_threads``, a retraining step of ``scripts/text_gpt.py``'s GPT went
    from 2.0 s to 0.14 s)."""
    before = numba.get_num_threads()
    want = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    if want == before:
        yield
        return
    numba.set_num_threads(want)
    try:
        yield
    finally:
        numba.set_num_threads(before)


class _MixtureNLL(torch.autograd.Function):
    """``sum_i -log sum_j exp(c_j - lambda_j (w_i - mu_j)^2 / 2)`` and its exact gradients,
    for a flat weight vector on a CUDA device (chunked (N, J) torch expressions)."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, mu: torch.Tensor, log_prec: torch.Tensor, log_pi: torch.Tensor):  # type: ignore[override]
        lam = log_prec.exp()
        c = log_pi + 0.5 * log_prec - 0.5 * LOG_2PI
        lse = torch.empty_like(w)
        for s in range(0, w.numel(), CHUNK):
            d = w[s : s + CHUNK, None] - mu
            lse[s : s + CHUNK] = torch.logsumexp(c - 0.5 * lam * d * d, dim=1)
        ctx.save_for_backward(w, mu, log_prec, lam, c, lse)
        return -lse.sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        w, mu, log_prec, lam, c, lse = ctx.saved_tensors
        gw = torch.empty_like(w)
        g_mu = torch.zeros_like(mu)
        g_prec = torch.zeros_like(mu)
        g_pi = torch.zeros_like(mu)
        for s in range(0, w.numel(), CHUNK):
            d = w[s : s + CHUNK, None] - mu
            t = lam * d
            r = torch.exp(c - 0.5 * t * d - lse[s : s + CHUNK, None])
            rt = r * t
            gw[s : s + CHUNK] = rt.sum(dim=1)
            g_mu -= rt.sum(dim=0)
            g_prec += (r * (0.5 * t * d)).sum(dim=0)
            g_pi -= r.sum(dim=0)
        g_prec += 0.5 * g_pi
        return grad * gw, grad * g_mu, grad * g_prec, grad * g_pi


class _MixtureNLLCPU(torch.autograd.Function):
    """The same quantity for CPU weight tensors, each passed as is: one numba pass per tensor
    computes the loss and every gradient, backward only scales them. No concatenation of the
    weights and no splitting of their gradient (together they cost as much as the kernel)."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, log_prec: torch.Tensor, log_pi: torch.Tensor, *weights: torch.Tensor):  # type: ignore[override]
        lam = log_prec.exp()
        c = log_pi + 0.5 * log_prec - 0.5 * LOG_2PI
        params = _kernel_params(*(t.detach().cpu().double().numpy() for t in (mu, lam, c)))
        acc = np.zeros((4, mu.numel()))
        grads = []
        with kernel_threads():
            for w in weights:
                wn = w.detach().contiguous().view(-1).numpy()
                gw = np.empty_like(wn)
                acc += _cpu_kernel(wn, params, gw, 1.0, False)[0]
                grads.append(torch.from_numpy(gw).view(w.shape))
        g_mu, g_prec, g_pi = (torch.from_numpy(g).to(mu.dtype) for g in _param_grads(acc))
        ctx.fused = (g_mu, g_prec, g_pi, grads)
        dtype = weights[0].dtype if weights else mu.dtype
        return torch.tensor(acc[0, 0], dtype=dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        g_mu, g_prec, g_pi, grads = ctx.fused
        return (grad * g_mu, grad * g_prec, grad * g_pi, *(g * grad for g in grads))


def _kernel_params(
    mu: np.ndarray, lam: np.ndarray, c: np.ndarray, fits_f32: bool | None = None
) -> dict[type, tuple[np.ndarray, ...]]:
    """Means, precisions and log-normalisers (float64) for the kernels, and a float32 copy
    when they are finite and well inside float32's range (the float32 kernel needs that;
    ``fits_f32`` when the caller already checked it)."""
    params = {np.float64: (mu, lam, c)}
    if fits_f32 is None:
        fits_f32 = all(np.isfinite(a).all() and np.abs(a).max(initial=0.0) < F32_LOGIT_LIMIT for a in (mu, lam, c))
    if fits_f32:
        params[np.float32] = tuple(a.astype(np.float32) for a in (mu, lam, c))
    return params


def _param_grads(acc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the NLL with respect to the means, log-precisions and log mixing
    proportions, from the kernel's per-component sums."""
    g_pi = -acc[3]
    return -acc[1], acc[2] + 0.5 * g_pi, g_pi


def _takes_f32(wn: np.ndarray, gw: np.ndarray, params: dict[type, tuple[np.ndarray, ...]]) -> bool:
    return wn.dtype == np.float32 and gw.dtype == np.float32 and np.float32 in params


def _cpu_kernel(
    wn: np.ndarray, params: dict[type, tuple[np.ndarray, ...]], gw: np.ndarray, scale: float, accumulate: bool,
    order: np.ndarray = _NATURAL,
) -> tuple[np.ndarray, float]:
    """Per-component sums of one flat weight array and the fraction of (weight, component)
    pairs evaluated; the gradient is written to ``gw`` (or added, times ``scale``). float32
    weights take the vectorised float32 kernel (which does extreme values in float64
    itself), in ``order`` (a permutation of the weights' indices from :func:`value_order`,
    empty for the natural order), others the float64 kernel."""
    if _takes_f32(wn, gw, params):
        if order.shape[0] not in (0, wn.shape[0]):
            raise ValueError(f"order has {order.shape[0]} entries for {wn.shape[0]} weights")
        acc, work = nll_and_grads_f32(wn, order, *params[np.float32], gw, scale, accumulate)
        return acc, work / max(wn.size * acc.shape[1], 1)
    return nll_and_grads(wn, *params[np.float64], gw, scale, accumulate), 1.0


def _table_on_one_grid(
    picks: list[tuple[np.ndarray, np.ndarray, tuple]], spans: list[tuple[float, float]],
    params: dict[type, tuple[np.ndarray, ...]], scale: float,
) -> tuple[list[tuple[tuple, np.ndarray]], list[bool]] | None:
    """The table path on float32 tensors ``picks`` ((weights, gradients, shard groups)), adding
    ``scale`` times the gradient into each one's gradients, over one grid covering all their
    ``spans``. Returns the per-component sums for each set of shard groups and, per tensor,
    whether its span can serve the next call (not when more than 1/1024 of its weights fell
    outside the grid); or None (nothing done) where the grid would be too fine for the span."""
    mu, lam, c = params[np.float64]
    h = 1.0 / math.sqrt(float(lam.max())) / TABLE_POINTS_PER_STD
    if not (h > 0 and math.isfinite(h)):
        return None
    lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
    points = int((hi - lo) / h) + 2
    if points > TABLE_MAX_POINTS:
        return None
    table, smooth = table_gradients(lo, h, points, mu, lam, c, TABLE_TOLERANCE)
    sums: dict[tuple[int, ...], tuple[tuple, np.ndarray, np.ndarray]] = {}
    keep = []
    for wn, gn, groups in picks:
        counts, off, outside = table_pass(wn, lo, 1.0 / h, table, smooth, gn, scale, True, numba.get_num_threads(),
                                          mu, lam, c)
        key = tuple(id(g) for g in groups)
        have = sums.get(key)
        sums[key] = (groups, counts, off) if have is None else (groups, have[1] + counts, have[2] + off)
        keep.append(outside <= wn.shape[0] >> 10)
    return [(g, table_sums(lo, h, counts, mu, lam, c) + off) for g, counts, off in sums.values()], keep


@dataclass
class _Grouping:
    """A weight tensor's value-grouped order, its age in calls, and whether it paid."""

    order: np.ndarray
    age: int = 0
    pays: bool = True


def _flat_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A writable flat numpy view of a contiguous float tensor on a kernel device, else None."""
    if t.device.type not in KERNEL_DEVICES or t.dtype not in (torch.float32, torch.float64) or not t.is_contiguous():
        return None
    return t.detach().view(-1).numpy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A parameter's values as a CPU numpy array (no copy on CPU)."""
    return t.detach().cpu().numpy()


def mixture_nll_many(
    weights: list[torch.Tensor], mu: torch.Tensor, log_prec: torch.Tensor, log_pi: torch.Tensor
) -> torch.Tensor:
    """Negative log-likelihood of all ``weights`` together under the mixture."""
    if all(t.device.type in KERNEL_DEVICES for t in weights):
        return _MixtureNLLCPU.apply(mu, log_prec, log_pi, *weights)
    w = torch.cat([t.reshape(-1) for t in weights])
    return _MixtureNLL.apply(w, mu, log_prec, log_pi)


@dataclass(frozen=True)
class PriorConfig:
    """Settings of the mixture and its hyper-priors (defaults after the original tutorial).

    Gamma hyper-priors are on the precisions ``lambda_j`` with shape ``alpha`` and rate
    ``beta`` (mean precision ``alpha/beta``). All components start wide (std 0.25, as in the
    original tutorial) so that the zero component first claims most weights; the non-zero
    components' prior is stiff (``alpha`` = 2500) so none of them turns into a wide
    catch-all that would absorb and then badly quantize many weights. LeNet-300-100's best
    settings start the non-zero components at std 0.1 (``init_std``): over four seeds 0.06
    point less error and 3% smaller files than 0.25; std 0.05 and below gave sparser but
    less accurate nets (README, "Results").

    These numbers are weight values, written for weights of RMS :data:`REFERENCE_RMS` (0.05,
    LeNet scale). ``scale_to_weights=True`` reads them relative to that instead: each prior
    multiplies the stds (and divides the precisions' Gamma means) by its weights' RMS over
    0.05, measured when it is made, and moves its means at a rate scaled the same way. The
    mixture then learns the same way on weights of any scale (a transformer's 0.02, a folded
    conv's 0.3); with the absolute default, a zero component of std 0.02 claims every
    weight of a model initialised at std 0.02.
    """

    components: int = 16
    pi_zero: float = 0.99
    learn_pi_zero: bool = False
    pi_zero_beta: tuple[float, float] = (1000.0, 10.0)
    gamma_zero: tuple[float, float] = (5000.0, 2.0)
    gamma_other: tuple[float, float] = (2500.0, 0.1)
    init_std: float = 0.25
    init_zero_std: float = 0.25
    scale_to_weights: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        if not 2 <= self.components <= 256:
            raise SwsConfigError(f"components must be in [2, 256], got {self.components}")
        if not 0.0 < self.pi_zero < 1.0:
            raise SwsConfigError(f"pi_zero must be in (0, 1), got {self.pi_zero}")
        for name in ("pi_zero_beta", "gamma_zero", "gamma_other"):
            a, b = getattr(self, name)
            if a <= 0 or b <= 0:
                raise SwsConfigError(f"{name} parameters must be positive, got {(a, b)}")
        if self.init_std <= 0 or self.init_zero_std <= 0:
            raise SwsConfigError("init_std and init_zero_std must be positive")


def initial_means(weights: torch.Tensor, count: int) -> torch.Tensor:
    """``count`` means spread evenly over the weights' range, none near zero.

    A plain ``linspace(min, max)`` of an odd count puts a mean on 0, where it competes
    with the zero component and is wasted; instead take ``count + 1`` evenly spaced points
    and drop the one closest to zero.
    """
    lo, hi = float(weights.min()), float(weights.max())
    if not hi > lo:
        lo, hi = lo - 1.0, hi + 1.0
    grid = torch.linspace(lo, hi, count + 1, dtype=torch.float64)
    keep = torch.ones(count + 1, dtype=torch.bool)
    keep[int(grid.abs().argmin())] = False
    return grid[keep].to(torch.float32)


class MixturePrior(nn.Module):
    """Gaussian-mixture prior over a set of weight tensors, with its hyper-priors.

    Component 0 is the zero component. Parameters are grouped (``means``,
    ``log_precisions``, ``mixing``) so that each gets its own learning rate.

    Example:
        >>> prior = MixturePrior(torch.randn(1000) * 0.1, PriorConfig(components=4))
        >>> float(prior.complexity([torch.zeros(10)])) > 0
        True
    """

    def __init__(
        self, init_weights: torch.Tensor, config: PriorConfig = PriorConfig(), *, weight_rms: float | None = None
    ) -> None:
        super().__init__()
        self.config = config
        j = config.components
        flat = init_weights.detach().flatten().float().cpu()
        self.means = nn.Parameter(initial_means(flat, j - 1))
        unit = 1.0
        if config.scale_to_weights:
            rms = weight_rms if weight_rms is not None else float(flat.double().square().mean().sqrt())
            if not math.isfinite(rms):
                raise SwsConfigError(f"scale_to_weights needs finite weights, got an RMS of {rms}")
            if rms > 0:
                unit = float(np.float32(rms / REFERENCE_RMS))  # what the float32 buffer holds exactly
            else:
                warnings.warn("scale_to_weights: these weights are all zero (a zero-initialised layer?); their "
                              "prior keeps PriorConfig's absolute units", stacklevel=3)
        # The factor from PriorConfig's units to these weights' (1.0 unless scale_to_weights),
        # float32 so that any device takes it; saved with the prior.
        self.register_buffer("unit", torch.tensor(unit, dtype=torch.float32))
        self._unit = unit
        log_prec = torch.full((j,), -2.0 * math.log(config.init_std * unit))
        log_prec[0] = -2.0 * math.log(config.init_zero_std * unit)
        self.log_precisions = nn.Parameter(log_prec)
        self.mixing_logits = nn.Parameter(torch.zeros(j - 1))
        p0 = config.pi_zero
        self.pi_zero_logit = nn.Parameter(
            torch.tensor(math.log(p0 / (1 - p0))), requires_grad=config.learn_pi_zero
        )
        # Value-grouped weight orders for the CPU training kernel and the table path's grid
        # spans with their age in calls (caches, not state).
        self._groupings: dict[int, _Grouping] = {}
        self._spans: dict[int, tuple[tuple[float, float], int]] = {}

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # States saved before scale_to_weights existed hold no unit: they were absolute (1.0).
        state_dict.setdefault(prefix + "unit", torch.tensor(1.0, dtype=torch.float32))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._unit = float(self.unit)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # .half() or .double() must not round the unit: it stays the float32 value it was.
        out = super()._apply(fn, recurse)
        self.unit = torch.tensor(self._unit, dtype=torch.float32, device=self.unit.device)
        return out

    def _rates(self) -> tuple[float, float]:
        """The Gamma rates of the zero and the other components, in these weights' units."""
        u2 = self._unit**2
        return self.config.gamma_zero[1] * u2, self.config.gamma_other[1] * u2

    def all_means(self) -> torch.Tensor:
        return torch.cat([self.means.new_zeros(1), self.means])

    def log_mixing(self) -> torch.Tensor:
        """Log mixing proportions: ``log pi_0`` then ``log(1 - pi_0) + log_softmax(logits)``."""
        z = self.pi_zero_logit
        log_p0 = nn.functional.logsigmoid(z)
        log_rest = nn.functional.logsigmoid(-z) + torch.log_softmax(self.mixing_logits, dim=0)
        return torch.cat([log_p0.reshape(1), log_rest])

    def hyper_nll(self) -> torch.Tensor:
        """Negative log hyper-prior: Gamma on precisions (density over the log), Beta on pi_0."""
        cfg = self.config
        g = self.log_precisions
        (a0, _), (a1, _) = cfg.gamma_zero, cfg.gamma_other
        b0, b1 = self._rates()
        out = -a0 * g[0] + b0 * g[0].exp() + (-a1 * g[1:] + b1 * g[1:].exp()).sum()
        if cfg.learn_pi_zero:
            a, b = cfg.pi_zero_beta
            z = self.pi_zero_logit
            # Beta(pi_0 | a, b) expressed over the logit (Jacobian included).
            out = out - a * nn.functional.logsigmoid(z) - b * nn.functional.logsigmoid(-z)
        return out

    def weights_nll(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return mixture_nll_many(weights, self.all_means(), self.log_precisions, self.log_mixing())

    def complexity(self, weights: list[torch.Tensor]) -> torch.Tensor:
        """``-log p(w) - log p(hyper)``: the term scaled by ``tau / N`` in the loss."""
        return self.weights_nll(weights) + self.hyper_nll()

    def add_complexity_grad_(self, weights: list[torch.Tensor], scale: float) -> float:
        """Add ``scale`` times the gradient of :meth:`complexity` to the ``.grad`` of the weights
        and of this prior's parameters; return the complexity.

        The same as ``(scale * prior.complexity(weights)).backward()`` (tested), but on CPU
        it adds the kernel's closed-form weight gradient into ``.grad`` in place and does the
        chain rule through the mixture's few small parameters in two small numba functions
        (bit-identical to the numpy expressions they replaced): no autograd graph,
        no weight-sized temporaries. Through autograd these cost as much as the kernel itself
        in a LeNet-300-100 step. Other devices take the autograd path.
        """
        with kernel_threads():
            return self._add_complexity_grad(weights, scale)

    def _add_complexity_grad(self, weights: list[torch.Tensor], scale: float) -> float:
        flat = [_flat_numpy(local(w)) for w in weights]
        if any(wn is None for wn in flat):
            if not any(is_sharded(w) for w in weights):
                value = self.complexity(weights)
                (scale * value).backward()
                return float(value.detach())
            return self._sharded_autograd_(weights, scale)
        cfg = self.config
        z = float(self.pi_zero_logit.detach())
        mu, lam, c, soft, lp, fits_f32 = mixture_params(
            *(_numpy(p) for p in (self.means, self.log_precisions, self.mixing_logits)), z, F32_LOGIT_LIMIT
        )
        params = _kernel_params(mu, lam, c, fits_f32)
        parts = []
        table = np.float32 in params and sum(wn.shape[0] for wn in flat if wn.dtype == np.float32) >= TABLE_MIN
        picks: list[tuple[int, np.ndarray, np.ndarray, tuple]] = []
        for i, (w, wn) in enumerate(zip(weights, flat)):
            if w.requires_grad and w.grad is None:
                w.grad = torch.zeros_like(w)
            gn = _flat_numpy(local(w.grad)) if w.requires_grad else None
            if gn is not None and gn.dtype == wn.dtype:
                if table and wn.shape[0] >= TABLE_MIN_TENSOR and _takes_f32(wn, gn, params):
                    picks.append((i, wn, gn, shard_groups(w)))
                else:
                    parts.append((shard_groups(w), self._grouped_kernel(i, wn, gn, params, scale)))
                continue
            gw = np.empty_like(wn)
            parts.append((shard_groups(w), _cpu_kernel(wn, params, gw, 1.0, False)[0]))
            if w.requires_grad:
                g = local(w.grad)
                g.add_(torch.from_numpy(gw).view(g.shape).to(g.dtype), alpha=scale)
        if picks:
            parts.extend(self._table_kernels(picks, params, scale))
        acc = sum_over_shards(parts) if parts else np.zeros((4, mu.size))
        # Chain rule through all_means, log_mixing and hyper_nll.
        g_means, g_lp, g_logits, g_pi0, rest_sum, hyper = mixture_param_grads(
            acc, lp, soft, *self._gamma_arrays(lp.size)
        )
        grads = [(self.means, g_means), (self.log_precisions, g_lp), (self.mixing_logits, g_logits)]
        if cfg.learn_pi_zero:
            a, b = cfg.pi_zero_beta
            p0 = math.exp(-np.logaddexp(0.0, -z))
            hyper += a * np.logaddexp(0.0, -z) + b * np.logaddexp(0.0, z)
            d_z = g_pi0 * (1 - p0) - p0 * rest_sum - a * (1 - p0) + b * p0
            grads.append((self.pi_zero_logit, d_z))
        for param, grad in grads:
            if not param.requires_grad:
                continue
            g = np.asarray(scale * grad).astype(_numpy(param).dtype).reshape(param.shape)
            if param.grad is None:
                param.grad = torch.from_numpy(g)
            else:
                param.grad.add_(torch.from_numpy(g).to(param.grad.device))
        return float(acc[0, 0]) + hyper

    def _sharded_autograd_(self, weights: list[torch.Tensor], scale: float) -> float:
        """:meth:`add_complexity_grad_` off the kernel devices (CUDA) with FSDP-sharded weights:
        autograd over each rank's local shards, then the mixture's gradient and the value summed
        over the shards before they reach the prior's parameters (identical on every rank)."""
        mixture = [self.all_means(), self.log_precisions, self.log_mixing()]
        detached = [t.detach().requires_grad_() for t in mixture]
        parts = []
        for w in weights:
            wl = local(w).detach().requires_grad_(w.requires_grad)
            nll = mixture_nll_many([wl], *detached)
            needs = detached + ([wl] if w.requires_grad else [])
            grads = torch.autograd.grad(nll, needs)
            if w.requires_grad:
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                local(w.grad).add_(grads[-1], alpha=scale)
            flat = torch.cat([nll.detach().reshape(1), *(g.detach().reshape(-1) for g in grads[:3])])
            parts.append((shard_groups(w), flat.double().cpu().numpy()))
        total = torch.from_numpy(sum_over_shards(parts))
        sizes = [t.numel() for t in mixture]
        g_parts = torch.split(total[1:], sizes)
        torch.autograd.backward(mixture, [scale * g.to(t.dtype).to(t.device).view(t.shape)
                                          for g, t in zip(g_parts, mixture)])
        hyper = self.hyper_nll()
        (scale * hyper).backward()
        return float(total[0]) + float(hyper.detach())

    def _gamma_arrays(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        """Shapes and rates of the Gamma hyper-priors per component (zero component first)."""
        (a0, _), (a1, _) = self.config.gamma_zero, self.config.gamma_other
        b0, b1 = self._rates()
        shape, rate = np.full(j, a1), np.full(j, b1)
        shape[0], rate[0] = a0, b0
        return shape, rate

    def reset_grouping(self) -> None:
        """Forget the value-grouped orders and grid spans. The float32 rounding depends on them,
        so the training loop calls this at every epoch start: a run resumed from an epoch
        checkpoint then repeats the uninterrupted run bit for bit."""
        self._groupings.clear()
        self._spans.clear()

    @property
    def grouping(self) -> tuple[int, int]:
        """(weight tensors whose CPU training kernel now runs in value-grouped order, tensors
        seen by the training path): tells whether the mixture has narrowed enough to pay."""
        return sum(g.pays for g in self._groupings.values()), len(self._groupings)

    def _table_kernels(
        self, picks: list[tuple[int, np.ndarray, np.ndarray, tuple]], params: dict[type, tuple[np.ndarray, ...]],
        scale: float,
    ) -> list[tuple[tuple, np.ndarray]]:
        """The table path on the picked weight tensors (index, weights, gradients, shard groups),
        each over the span of its values kept from earlier calls (re-measured every
        REGROUP_EVERY calls, at every epoch start and when weights leave it, and widened by
        TABLE_MARGIN); tensors holding a non-finite weight, and all of them where the grid
        would be too fine, take the exact kernel. Returns (shard groups, sums) parts."""
        parts, served, spans = [], [], []
        for i, wn, gn, groups in picks:
            kept = self._spans.get(i)
            if kept is not None and kept[1] < REGROUP_EVERY:
                span, age = kept
            else:
                lo, hi, finite = table_range(wn)
                if not finite:
                    self._spans.pop(i, None)
                    parts.append((groups, self._grouped_kernel(i, wn, gn, params, scale)))
                    continue
                span, age = (lo - TABLE_MARGIN * (hi - lo), hi + TABLE_MARGIN * (hi - lo)), 0
            served.append((i, wn, gn, groups))
            spans.append((span, age))
        done = _table_on_one_grid([p[1:] for p in served], [sp for sp, _ in spans], params, scale) if served else None
        if done is None:
            for i, wn, gn, groups in served:
                self._spans.pop(i, None)
                parts.append((groups, self._grouped_kernel(i, wn, gn, params, scale)))
            return parts
        sums, keep = done
        for (i, *_), (span, age), ok in zip(served, spans, keep):
            if ok:
                self._spans[i] = (span, age + 1)
            else:
                self._spans.pop(i, None)
        return parts + sums

    def _grouped_kernel(
        self, i: int, wn: np.ndarray, gn: np.ndarray, params: dict[type, tuple[np.ndarray, ...]], scale: float
    ) -> np.ndarray:
        """The kernel on the ``i``-th weight tensor of the training loop, adding into its
        gradient ``gn``, in the tensor's value-grouped order while that pays (see
        ``REGROUP_EVERY``). Any order gives the same result up to float32 rounding; a stale
        one is only slower."""
        if not _takes_f32(wn, gn, params):
            return _cpu_kernel(wn, params, gn, scale, True)[0]
        g = self._groupings.get(i)
        if g is None or g.order.shape[0] != wn.shape[0] or g.age >= REGROUP_EVERY:
            g = self._groupings[i] = _Grouping(value_order(wn))
            acc, frac = _cpu_kernel(wn, params, gn, scale, True, g.order)
            g.pays = frac < PAYS_BELOW
        else:
            acc, _ = _cpu_kernel(wn, params, gn, scale, True, g.order if g.pays else _NATURAL)
        g.age += 1
        return acc

    @torch.no_grad()
    def snapshot(self) -> dict[str, np.ndarray]:
        """Means, standard deviations and mixing proportions as numpy arrays (for plots)."""
        return {
            "means": self.all_means().cpu().double().numpy(),
            "stds": torch.exp(-0.5 * self.log_precisions).cpu().double().numpy(),
            "pi": self.log_mixing().exp().cpu().double().numpy(),
        }

    def param_groups(self, lr_means: float, lr_log_precisions: float, lr_mixing: float) -> list[dict]:
        """Optimizer groups; the means' rate is in PriorConfig's units (see ``scale_to_weights``)."""
        mixing = [self.mixing_logits] + ([self.pi_zero_logit] if self.config.learn_pi_zero else [])
        return [
            {"params": [self.means], "lr": lr_means * self._unit, "name": "means"},
            {"params": [self.log_precisions], "lr": lr_log_precisions, "name": "log_precisions"},
            {"params": mixing, "lr": lr_mixing, "name": "mixing"},
        ]


class PriorGroups(nn.Module):
    """One :class:`MixturePrior` per group of weight tensors, each with its own means,
    precisions and mixing proportions: layers whose weights live on different scales (an
    embedding and a projection, the first conv and the classifier) need not share one codebook.

    It takes the place of a single prior in the training loop: the complexity and its gradient
    are the sums over the groups. ``members[g]`` lists the indices, within the weight list
    passed to every call, of group ``g``'s tensors.
    """

    def __init__(self, priors: list[MixturePrior], members: list[list[int]], keys: list[str]) -> None:
        super().__init__()
        if not (len(priors) == len(members) == len(keys)) or not priors:
            raise ValueError("one prior, one member list and one key per group, at least one group")
        self.priors = nn.ModuleList(priors)
        self.members, self.keys = members, keys

    @classmethod
    def build(cls, weights: list[torch.Tensor], keys: list[str], config: PriorConfig, make) -> PriorGroups:
        """Groups by ``keys`` (one per weight, first appearance first), each prior made by
        ``make(config, its weights)``."""
        order: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            order.setdefault(k, []).append(i)
        members = list(order.values())
        return cls([make(config, [weights[i] for i in idx]) for idx in members], members, list(order))

    def _split(self, weights: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        return [[weights[i] for i in idx] for idx in self.members]

    def group_of(self) -> list[int]:
        """For each weight (by its index in the list), its group's index."""
        out = [0] * sum(len(m) for m in self.members)
        for g, idx in enumerate(self.members):
            for i in idx:
                out[i] = g
        return out

    def complexity(self, weights: list[torch.Tensor]) -> torch.Tensor:
        return sum(p.complexity(ws) for p, ws in zip(self.priors, self._split(weights)))

    def add_complexity_grad_(self, weights: list[torch.Tensor], scale: float) -> float:
        return sum(p.add_complexity_grad_(ws, scale) for p, ws in zip(self.priors, self._split(weights)))

    def reset_grouping(self) -> None:
        for p in self.priors:
            p.reset_grouping()

    @property
    def grouping(self) -> tuple[int, int]:
        pays = [p.grouping for p in self.priors]
        return sum(a for a, _ in pays), sum(b for _, b in pays)

    def param_groups(self, lr_means: float, lr_log_precisions: float, lr_mixing: float) -> list[dict]:
        out = []
        for key, prior in zip(self.keys, self.priors):
            for group in prior.param_groups(lr_means, lr_log_precisions, lr_mixing):
                out.append({**group, "name": f"{group['name']}/{key}"})
        return out

@dataclass
class Mixture:
    """A plain (numpy, float64) mixture: component 0 is the zero component."""

    means: np.ndarray
    stds: np.ndarray
    pi: np.ndarray

    @classmethod
    def from_prior(cls, prior: MixturePrior) -> Mixture:
        s = prior.snapshot()
        return cls(s["means"], s["stds"], s["pi"])

    def log_joint(self, w: np.ndarray) -> np.ndarray:
        """``log pi_j + log N(w_i | mu_j, sigma_j^2)`` as an (N, J) array."""
        var = self.stds**2
        d = w[:, None] - self.means[None, :]
        return np.log(self.pi) - 0.5 * np.log(2 * np.pi * var) - 0.5 * d * d / var

    def assign(self, w: np.ndarray, rule: str = "map", chunk: int = CHUNK) -> np.ndarray:
        """Component of each weight: ``"map"`` = largest responsibility (the paper's rule),
        ``"nearest"`` = closest mean (smallest change to the weight)."""
        if rule not in ("map", "nearest"):
            raise SwsConfigError(f"assignment rule must be 'map' or 'nearest', got {rule!r}")
        out = np.empty(w.shape[0], dtype=np.int64)
        for s in range(0, w.shape[0], chunk):
            part = w[s : s + chunk]
            if rule == "map":
                out[s : s + chunk] = self.log_joint(part).argmax(axis=1)
            else:
                out[s : s + chunk] = np.abs(part[:, None] - self.means[None, :]).argmin(axis=1)
        return out


def symmetric_kl(m1: float, s1: float, m2: float, s2: float) -> float:
    """Symmetrised KL divergence between two 1-D Gaussians."""
    v1, v2 = s1 * s1, s2 * s2
    kl12 = 0.5 * (v1 / v2 + (m1 - m2) ** 2 / v2 - 1.0 + math.log(v2 / v1))
    kl21 = 0.5 * (v2 / v1 + (m1 - m2) ** 2 / v1 - 1.0 + math.log(v1 / v2))
    return 0.5 * (kl12 + kl21)


def merge_components(mix: Mixture, threshold: float) -> tuple[Mixture, int]:
    """Merge pairs of components that are redundant: KL below ``threshold``.

    The divergence is the KL between two Gaussians at the pair's means that both have the
    *smaller* of the two variances, ``(mu_i - mu_j)^2 / (2 min(sigma)^2)``: a wide component
    that has not converged does not swallow its neighbours. The closest pair is merged first
    (moment matching, weighted by ``pi``); a pair that includes the zero component keeps
    mean 0. Returns the new mixture and the merge count.
    """
    means, stds, pi = list(mix.means), list(mix.stds), list(mix.pi)
    merged = 0
    # Keep at least one non-zero component: a model whose weights are all zero is useless.
    while len(means) > 2:
        best, pair = threshold, None
        for i in range(len(means)):
            for j in range(i + 1, len(means)):
                s = min(stds[i], stds[j])
                d = symmetric_kl(means[i], s, means[j], s)
                if d < best:
                    best, pair = d, (i, j)
        if pair is None:
            break
        i, j = pair
        p = pi[i] + pi[j]
        m = 0.0 if i == 0 else (pi[i] * means[i] + pi[j] * means[j]) / p
        second = (pi[i] * (stds[i] ** 2 + means[i] ** 2) + pi[j] * (stds[j] ** 2 + means[j] ** 2)) / p
        means[i], stds[i], pi[i] = m, math.sqrt(max(second - m * m, 1e-30)), p
        del means[j], stds[j], pi[j]
        merged += 1
    return Mixture(np.array(means), np.array(stds), np.array(pi)), merged
