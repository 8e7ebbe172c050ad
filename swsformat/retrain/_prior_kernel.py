"""Fused numba kernels for the mixture negative log-likelihood and all of its gradients.

On a CPU the plain torch expression builds several (N, J) temporaries per step and
costs many times a LeNet training step. Both kernels make one pass over a weight tensor,
return the NLL and the per-component sums, and write (or add, scaled, into an existing
gradient buffer) ``d NLL / d w``:

* ``nll_and_grads`` (float64 arithmetic): exact, evaluates ``exp`` only for the components
  within ``CUTOFF`` nats of the best one.
* ``nll_and_grads_f32`` (the training path): blocks of ``BLOCK_F32`` weights laid out
  component-major so every inner loop is a straight SIMD loop (8 or 16 float32 lanes) with a
  polynomial ``exp``. The exponents are taken against one constant per block, the largest
  logit any of its weights can reach, instead of each weight's best logit: that drops a
  whole pass (the per-weight max). The few weights whose every logit lies more than 60 nats
  below it, and whole blocks whose logits could leave float32's range, take the exact
  float64 path. Relative error about 1e-6 against the float64 kernel (tested), below
  float32 training noise.

  Its float arithmetic is pinned down in the source, so that every compilation of it
  rounds alike: no reassociation or contraction flags (``_EXACT``), each fused
  multiply-add written as one (``_fma``), and every sum over a block kept in ``LANES``
  fixed partial sums. With ``fastmath=True`` the kernel numba compiled in the process and
  the same kernel loaded from numba's cache rounded differently (numba optimises the two
  differently, numba issue #10617): the first run after an install and every later one
  trained to different weights.

  Once the mixture has narrowed, most components cannot reach a block of weights that
  are close in value: the kernel skips them, and the training loop feeds it the weights in
  a value-grouped order (``value_order``, within L2-sized chunks). With LeNet-300-100's
  mixture from its fourth retraining epoch on, 26% of the (weight, component) pairs are
  left and the kernel takes about half the time of the full one, gathers and scatters
  included.
"""

from __future__ import annotations

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ..kernels import njit

CUTOFF = 36.0
# The float32 kernel skips a component for a block of weights when it lies more than SKIP
# nats below every weight's best component there: its responsibility is then below
# exp(-24) = 4e-11, which moves no float32 sum of a weight's terms, and all the skipped
# responsibilities of LeNet-300-100's 266K weights add up to at most 1e-5 of one weight.
SKIP = 24.0
BLOCK = 16384
BLOCK_F32 = 256
# Fixed partial sums per block sum (see _lane_sum); the lane helpers are written for 16.
LANES = 16
assert BLOCK_F32 % LANES == 0 and LANES == 16
ORDER_CHUNK = 64 * BLOCK_F32
# float32 constants: a Python float in a numba expression would promote it to float64.
_F = np.float32
_HALF = _F(0.5)
_ZERO = _F(0.0)
_ONE = _F(1.0)
_LOG2E = _F(1.4426950408889634)
_LN2_HI = _F(0.693359375)
_LN2_LO = _F(-2.12194440e-4)
_LN2_64 = np.log(2.0)
# Degree-5 Chebyshev fit of exp on [-ln2/2, ln2/2]: max relative error 2.5e-7 in float32,
# the same as the degree-6 Taylor polynomial with one FMA less.
_P0, _P1, _P2, _P3, _P4, _P5 = (
    _F(v) for v in (1.0000001192092896, 1.0, 0.49998870491981506, 0.16666415333747864, 0.041917528957128525, 0.008375128731131554)
)
_LOWEST = _F(-87.0)
_EXPONENT = np.int32(0x7F800000)
_NAN32 = _F(np.nan)
_NAN64 = np.float64(np.nan)
# A weight whose mixture density is below exp(-60) relative to the largest c_j is done
# exactly: its float32 exponentials would be too close to the clamp at exp(-87).
_TINY = _F(np.exp(-60.0))
# A block is done in float32 only while every |logit| provably stays far below float32's maximum.
F32_LOGIT_LIMIT = 1e30


@intrinsic
def _bits_to_f32(typingctx, bits):
    """Reinterpret an int32 as a float32 (builds ``2**n`` in the vectorised ``exp``)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    """Reinterpret a float32 as an int32: a non-finite test that fastmath cannot fold away."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _fmax(typingctx, a, b):
    """``llvm.maxnum.f32``: one ``vmaxps`` in a vectorised loop (numba's NaN-aware ``max``
    does not vectorise)."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType(), ir.FloatType()])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.maxnum.f32")
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32), codegen


# The float32 kernel's fast-math flags: no NaN/inf/signed-zero care, but no reassociation,
# contraction or approximate functions, whose use the compiler may decide differently from
# one compilation to the next.
_EXACT = {"nnan", "ninf", "nsz"}


@intrinsic
def _fma(typingctx, a, b, c):
    """``llvm.fma.f32``: ``a * b + c`` rounded once, whatever the compiler's choices."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.FloatType(), [ir.FloatType()] * 3)
        fn = cgutils.get_or_insert_function(builder.module, fnty, "llvm.fma.f32")
        return builder.call(fn, args)

    return types.float32(types.float32, types.float32, types.float32), codegen


@njit(inline="always", fastmath=_EXACT)
def _exp_nonpositive(x):
    """``exp(x)`` for ``x <= 0`` (inputs below -87 give ~1e-38, not 0): Cody-Waite reduction,
    a degree-5 polynomial on ``[-ln2/2, ln2/2]`` and the exponent set by bit pattern."""
    x = _fmax(x, _LOWEST)
    n = np.int32(_fma(-x, _LOG2E, _HALF))
    nf = np.float32(n)
    r = _fma(nf, _LN2_LO, _fma(nf, _LN2_HI, x))
    p = _fma(r, _fma(r, _fma(r, _fma(r, _fma(r, _P5, _P4), _P3), _P2), _P1), _P0)
    return p * _bits_to_f32((np.int32(127) - n) << 23)


@njit(inline="always")
def _exact_one(wi, mu, lam, c, acc, e):
    """NLL terms and gradient of one weight in float64, added into ``acc``; returns
    ``d NLL / d w``. ``e`` is scratch of length J. A non-finite weight makes both NaN."""
    if not np.isfinite(wi):
        acc[0, 0] = np.nan
        return np.nan
    j_count = mu.shape[0]
    best = -np.inf
    for j in range(j_count):
        d = wi - mu[j]
        v = c[j] - 0.5 * lam[j] * d * d
        e[j] = v
        if v > best:
            best = v
    total = 0.0
    for j in range(j_count):
        v = e[j] - best
        if v > -CUTOFF:
            e[j] = np.exp(v)
            total += e[j]
        else:
            e[j] = 0.0
    acc[0, 0] -= best + np.log(total)
    g = 0.0
    inv = 1.0 / total
    for j in range(j_count):
        r = e[j] * inv
        if r != 0.0:
            d = wi - mu[j]
            t = lam[j] * d
            g += r * t
            acc[1, j] += r * t
            acc[2, j] += r * 0.5 * t * d
            acc[3, j] += r
    return g


@njit(inline="never", fastmath=_EXACT)
def _reciprocals(total: np.ndarray, m: int) -> None:
    """``total[k] = 1 / total[k]`` where it is at least ``_TINY``, else 0, for ``k < m``
    (exact divisions)."""
    for k in range(m):
        t = total[k]
        total[k] = _ONE / t if t >= _TINY else _ZERO


@njit(inline="always", fastmath=_EXACT)
def _count_far(total: np.ndarray, m: int) -> int:
    """How many of ``total[:m]`` are below ``_TINY``: weights the caller redoes in float64."""
    far = 0
    for k in range(m):
        far += np.int64(total[k] < _TINY)
    return far


@njit(inline="never", fastmath=_EXACT)
def _log_product(total: np.ndarray, m: int, lanes: np.ndarray) -> float:
    """``sum log total[k]`` over the ``total[k] >= _TINY`` of ``k < m``, with one ``log``:
    the float32 exponent fields summed as integers and the mantissas (as numbers in [1, 2))
    multiplied in float64, in LANES fixed partial products, so the loop vectorises without
    reassociation (the scalar loop it replaced, a chain of dependent float64 products, took
    a quarter of the kernel on a converged LeNet-300-100 mixture). ``m <= BLOCK_F32``: no
    partial product exceeds 2**16. ``lanes``: float64 scratch of length LANES."""
    expo = np.int64(0)
    for q in range(LANES):
        lanes[q] = 1.0
    for k0 in range(0, m, LANES):
        for q in range(LANES):
            k = k0 + q
            t = total[k] if k < m else _ONE
            bits = _f32_to_bits(t)
            ok = t >= _TINY
            expo += np.int64(((bits >> 23) & 0xFF) - 127) if ok else np.int64(0)
            lanes[q] *= np.float64(_bits_to_f32((bits & 0x007FFFFF) | 0x3F800000)) if ok else 1.0
    prod = ((lanes[0] * lanes[1]) * (lanes[2] * lanes[3])) * ((lanes[4] * lanes[5]) * (lanes[6] * lanes[7]))
    prod *= ((lanes[8] * lanes[9]) * (lanes[10] * lanes[11])) * ((lanes[12] * lanes[13]) * (lanes[14] * lanes[15]))
    return np.log(prod) + np.float64(expo) * _LN2_64


@njit(inline="never", fastmath=_EXACT)
def _lane_sum(lanes: np.ndarray, s: int) -> float:
    """``lanes[s:s + LANES]`` (float32) added pairwise in a fixed order."""
    a = (lanes[s] + lanes[s + 1]) + (lanes[s + 2] + lanes[s + 3])
    b = (lanes[s + 4] + lanes[s + 5]) + (lanes[s + 6] + lanes[s + 7])
    c = (lanes[s + 8] + lanes[s + 9]) + (lanes[s + 10] + lanes[s + 11])
    d = (lanes[s + 12] + lanes[s + 13]) + (lanes[s + 14] + lanes[s + 15])
    return (a + b) + (c + d)


def value_order(w: np.ndarray) -> np.ndarray:
    """A permutation of ``range(len(w))`` that groups the weights by value within each chunk
    of ``ORDER_CHUNK`` (a multiple of the kernel's block): a counting sort into equal-width
    buckets, non-finite values last. Consecutive blocks of the order then span narrow value
    ranges, so :func:`nll_and_grads_f32` can skip the components out of their reach, and
    its gathers and scatters stay within a chunk that fits in the L2 cache (over the whole
    tensor they cost as much as they save). O(n), parallel over chunks."""
    n = w.shape[0]
    out = np.empty(n, np.int32 if n < 2**31 else np.int64)
    _value_order(w, out, ORDER_CHUNK)
    return out


@njit(parallel=True, nogil=True)
def _value_order(w: np.ndarray, out: np.ndarray, chunk: int) -> None:
    n = w.shape[0]
    for ci in numba.prange((n + chunk - 1) // chunk):
        s = ci * chunk
        e = min(n, s + chunk)
        lo = np.inf
        hi = -np.inf
        for i in range(s, e):
            v = np.float64(w[i])
            if np.isfinite(v):
                lo = min(lo, v)
                hi = max(hi, v)
        if not hi > lo:
            for i in range(s, e):
                out[i] = i
            continue
        buckets = max(1, (e - s) // 32)
        per = buckets / (hi - lo)
        start = np.zeros(buckets + 2, np.int64)
        slot = np.empty(e - s, np.int32)
        for i in range(s, e):
            v = np.float64(w[i])
            b = min(np.int64((v - lo) * per), buckets - 1) if np.isfinite(v) else buckets
            slot[i - s] = b
            start[b + 1] += 1
        start[0] = s
        for b in range(buckets + 1):
            start[b + 1] += start[b]
        for i in range(s, e):
            b = slot[i - s]
            out[start[b]] = i
            start[b] += 1


@njit(parallel=True, fastmath=_EXACT, nogil=True)
def nll_and_grads_f32(
    w: np.ndarray, order: np.ndarray, mu: np.ndarray, lam: np.ndarray, c: np.ndarray, gw: np.ndarray,
    scale: float, accumulate: bool,
) -> tuple[np.ndarray, int]:
    """float32 twin of :func:`nll_and_grads` (same arguments and first output; float32 ``w``,
    ``gw``, ``mu``, ``lam``, ``c``; sums are float64 across blocks), which also returns the
    number of (weight, component) pairs it evaluated.

    Blocks are taken in ``order``, a permutation of ``range(len(w))`` (an empty ``order``
    means the natural order; the caller guarantees a permutation, e.g. from
    :func:`value_order`). Within a block, a component whose largest logit over the block's
    value range lies more than ``SKIP`` nats below the smallest possible best logit there
    is skipped: it moves no responsibility by more than ``exp(-24)``. That is exact to
    float32 for any order; a value-grouped order only makes it pay (a converged mixture
    leaves 2-4 of 16 components per block). The mixture parameters must be finite
    (fastmath): the caller sends non-finite ones to the float64 kernel."""
    n = w.shape[0]
    j_count = mu.shape[0]
    size = BLOCK_F32
    blocks = (n + size - 1) // size
    partial = np.zeros((blocks, 4, j_count))
    work = np.zeros(blocks, np.int64)
    natural = order.shape[0] == 0
    mu64 = mu.astype(np.float64)
    lam64 = lam.astype(np.float64)
    c64 = c.astype(np.float64)
    mu_reach = np.abs(mu64).max()
    logit_reach = np.abs(c64).max()
    half_lam_max = 0.5 * lam64.max()
    scale32 = np.float32(scale)
    per_chunk = 16
    for ci in numba.prange((blocks + per_chunk - 1) // per_chunk):
        # Scratch allocated once per 16 blocks: with most components skipped, allocating it
        # per block would cost a large part of the kernel.
        ww = np.empty(size, np.float32)
        g = np.empty(size, np.float32)
        total = np.empty(size, np.float32)
        ex = np.empty(j_count * size, np.float32)
        upper = np.empty(j_count)
        active = np.empty(j_count, np.int64)
        e = np.empty(j_count)
        lanes = np.empty(3 * LANES, np.float32)
        lanes64 = np.empty(LANES)
        for b in range(ci * per_chunk, min(blocks, (ci + 1) * per_chunk)):
            s = b * size
            m = min(n, s + size) - s
            acc = partial[b]
            if natural:
                for k in range(m):
                    ww[k] = w[s + k]
            else:
                for k in range(m):
                    ww[k] = w[order[s + k]]
            for k in range(m, size):
                ww[k] = ww[0]  # padding inside the block's range: its exponentials stay <= 1
            reach = _ZERO
            neg_lo = -ww[0]
            hi = ww[0]
            special = np.int32(0)  # all exponent bits set: a NaN or infinite weight
            for k in range(size):
                reach = _fmax(reach, abs(ww[k]))
                hi = _fmax(hi, ww[k])
                neg_lo = _fmax(neg_lo, -ww[k])
                special |= np.int32(_f32_to_bits(ww[k]) & _EXPONENT == _EXPONENT)
            for k in range(size):
                g[k] = _ZERO
            spread = np.float64(reach) + mu_reach
            if special or not logit_reach + half_lam_max * spread * spread < F32_LOGIT_LIMIT:
                # Extreme or NaN values: the whole block in float64 (NaN propagates).
                work[b] = m * j_count
                for k in range(m):
                    if _f32_to_bits(ww[k]) & _EXPONENT == _EXPONENT:
                        # Tested by bit pattern: fastmath may fold a NaN test away.
                        acc[0, 0] = _NAN64
                        g[k] = _NAN32
                    else:
                        g[k] = _exact_one(np.float64(ww[k]), mu64, lam64, c64, acc, e)
            else:
                # Bounds over the block's range [lo, hi]: each component's largest logit, and the
                # largest of the components' smallest logits, below which no weight's best falls.
                lo64 = -np.float64(neg_lo)
                hi64 = np.float64(hi)
                top = -np.inf
                floor = -np.inf
                for j in range(j_count):
                    a = lo64 - mu64[j]
                    z = hi64 - mu64[j]
                    near = a * a if a > 0.0 else (z * z if z < 0.0 else 0.0)
                    upper[j] = c64[j] - 0.5 * lam64[j] * near
                    top = max(top, upper[j])
                    floor = max(floor, c64[j] - 0.5 * lam64[j] * max(a * a, z * z))
                n_active = 0
                for j in range(j_count):
                    if upper[j] >= floor - SKIP:
                        active[n_active] = j
                        n_active += 1
                work[b] = m * n_active
                # Exponents against the block's top logit, so every exponential is <= 1.
                for k in range(size):
                    total[k] = _ZERO
                for i in range(n_active):
                    j = active[i]
                    mj = mu[j]
                    hj = _HALF * lam[j]
                    cj = np.float32(c64[j] - top)
                    o = i * size
                    for k in range(size):
                        d = ww[k] - mj
                        e32 = _exp_nonpositive(_fma(-hj * d, d, cj))
                        ex[o + k] = e32
                        total[k] += e32
                # -log of the totals (one log per block) and their reciprocals: both loops vectorise.
                far = _count_far(total, m)
                acc[0, 0] = -_log_product(total, m, lanes64) - top * (m - far)
                _reciprocals(total, m)
                for k in range(m, size):
                    total[k] = _ZERO
                for i in range(n_active):
                    j = active[i]
                    mj = mu[j]
                    lj = lam[j]
                    o = i * size
                    for q in range(3 * LANES):
                        lanes[q] = _ZERO
                    for k0 in range(0, size, LANES):
                        for q in range(LANES):
                            k = k0 + q
                            r = ex[o + k] * total[k]
                            d = ww[k] - mj
                            rt = r * lj * d
                            g[k] += rt
                            lanes[q] += rt
                            lanes[LANES + q] = _fma(rt, d, lanes[LANES + q])
                            lanes[2 * LANES + q] += r
                    acc[1, j] = _lane_sum(lanes, 0)
                    acc[2, j] = _HALF * _lane_sum(lanes, LANES)
                    acc[3, j] = _lane_sum(lanes, 2 * LANES)
                if far:
                    for k in range(m):
                        if total[k] == _ZERO:
                            g[k] = _exact_one(np.float64(ww[k]), mu64, lam64, c64, acc, e)
            if natural:
                if accumulate:
                    for k in range(m):
                        gw[s + k] += scale32 * g[k]
                else:
                    for k in range(m):
                        gw[s + k] = g[k]
            elif accumulate:
                for k in range(m):
                    gw[order[s + k]] += scale32 * g[k]
            else:
                for k in range(m):
                    gw[order[s + k]] = g[k]
    return partial.sum(axis=0), work.sum()


@njit(parallel=True, nogil=True)
def nll_and_grads(
    w: np.ndarray, mu: np.ndarray, lam: np.ndarray, c: np.ndarray, gw: np.ndarray, scale: float, accumulate: bool
) -> np.ndarray:
    """Return ``acc`` of shape (4, J): row 0 col 0 holds the NLL, rows 1-3 the sums
    ``sum_i r_ij lam_j (w_i - mu_j)``, ``sum_i r_ij lam_j (w_i - mu_j)^2 / 2`` and
    ``sum_i r_ij``. ``d NLL / d w`` goes to ``gw``, or with ``accumulate`` is added to it
    times ``scale``."""
    n = w.shape[0]
    j_count = mu.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    partial = np.zeros((blocks, 4, j_count))
    for b in numba.prange(blocks):
        e = np.empty(j_count)
        acc = partial[b]
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            g = _exact_one(np.float64(w[i]), mu, lam, c, acc, e)
            if accumulate:
                gw[i] += scale * g
            else:
                gw[i] = g
    return partial.sum(axis=0)


# The mixture's few parameters, on the training path: in numpy these took about 30 small
# array operations a step (0.1 ms, as much as 4% of a LeNet-300-100 step). libm's exp, log
# and log1p, as numpy uses.
_HALF_LOG_2PI = 0.5 * np.log(2.0 * np.pi)


@njit(nogil=True)
def _sum(a: np.ndarray) -> float:
    """Sum of a short 1-D float64 array (one entry per mixture component), left to right."""
    res = 0.0
    for v in a:
        res += v
    return res


@njit(nogil=True)
def mixture_params(
    means: np.ndarray, log_prec: np.ndarray, logits: np.ndarray, z: float, limit: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    """Means (zero component first), precisions, log-normalisers ``log pi_j + log(lambda_j)/2
    - log(2 pi)/2``, the softmax of the mixing logits and the log-precisions, all float64,
    and whether the first three are finite and below ``limit`` (the float32 kernel's
    condition)."""
    j = log_prec.shape[0]
    lp = np.empty(j)
    for i in range(j):
        lp[i] = np.float64(log_prec[i])
    soft = np.empty(j - 1)
    top = np.float64(logits[0])
    for i in range(j - 1):
        top = max(top, np.float64(logits[i]))
    for i in range(j - 1):
        soft[i] = np.exp(np.float64(logits[i]) - top)
    total = _sum(soft)
    for i in range(j - 1):
        soft[i] = soft[i] / total
    lse_pos = np.logaddexp(0.0, z)
    mu = np.empty(j)
    lam = np.empty(j)
    c = np.empty(j)
    mu[0] = 0.0
    for i in range(1, j):
        mu[i] = np.float64(means[i - 1])
    ok = True
    for i in range(j):
        lam[i] = np.exp(lp[i])
        log_pi = -np.logaddexp(0.0, -z) if i == 0 else np.log(soft[i - 1]) - lse_pos
        c[i] = (log_pi + 0.5 * lp[i]) - _HALF_LOG_2PI
        ok = ok and abs(mu[i]) < limit and abs(lam[i]) < limit and abs(c[i]) < limit
    return mu, lam, c, soft, lp, ok


@njit(nogil=True)
def mixture_param_grads(
    acc: np.ndarray, lp: np.ndarray, soft: np.ndarray, shape: np.ndarray, rate: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, float]:
    """From the kernels' summed ``acc`` (see :func:`nll_and_grads`): the gradients of the
    NLL plus the Gamma hyper-priors with respect to the means, log-precisions and mixing
    logits, the NLL's gradient with respect to ``log pi_0``, the sum of the non-zero
    components' ``d/d log pi_j``, and the Gamma terms' value."""
    j = lp.shape[0]
    g_pi = -acc[3]
    expd = np.empty(j)
    terms = np.empty(j)
    g_lp = np.empty(j)
    for i in range(j):
        e = np.exp(lp[i])
        expd[i] = rate[i] * e
        terms[i] = expd[i] - shape[i] * lp[i]
        g_lp[i] = (acc[2, i] + 0.5 * g_pi[i] + expd[i]) - shape[i]
    rest = g_pi[1:]
    rest_sum = _sum(rest)
    g_means = -acc[1, 1:]
    g_logits = np.empty(j - 1)
    for i in range(j - 1):
        g_logits[i] = rest[i] - soft[i] * rest_sum
    return g_means, g_lp, g_logits, g_pi[0], rest_sum, _sum(terms)


# The table path for large float32 tensors on the training path. The prior's gradient and its
# per-component terms are functions of the weight's value alone, smooth on the scale of the
# narrowest component: they are evaluated exactly (float64, ``_exact_one``) on a grid of
# TABLE_POINTS_PER_STD points per narrowest std across the tensor's range, each weight's
# gradient is interpolated linearly between its two grid points (where that is within
# TABLE_TOLERANCE of the largest gradient; elsewhere the weight takes the exact path), and the per-component sums
# come from the weights' linear binning onto the grid (each weight's share of its two grid
# points in integer units of 1/TABLE_ONE: integer sums do not depend on how the threads split
# the tensor). One light pass per weight instead of a pass
# per weight and component (split into three loops, see ``table_pass``); four count rows per
# thread, taken in turn, keep consecutive weights of similar value from waiting on each
# other's increments. The grid spans a range the caller
# keeps from an earlier call (a pass for the range costs a third of the rest); the rare weight
# outside it takes the exact float64 path.
TABLE_POINTS_PER_STD = 16
TABLE_MAX_POINTS = 1 << 16
TABLE_TOLERANCE = 1e-4
TABLE_ONE = 1 << 16
_TABLE_ONE_F = np.float32(TABLE_ONE)
_ROWS = 4
TABLE_RUN = 1024
# A weight adds 1 << _PACK_SHIFT (its count) plus its fraction in units of 1/TABLE_ONE (at most
# 1 << 16) to one int64: _PACK_FLUSH weights' fractions stay below 1 << _PACK_SHIFT, so the
# two sums are unpacked exactly every _PACK_FLUSH weights.
_PACK_SHIFT = 37
_PACK_ONE = np.int64(1) << _PACK_SHIFT
_PACK_FLUSH = 1 << 20


@njit(parallel=True, nogil=True)
def table_range(w: np.ndarray) -> tuple[float, float, bool]:
    """Smallest and largest weight, and whether every weight is finite."""
    n = w.shape[0]
    blocks = max((n + BLOCK - 1) // BLOCK, 1)
    lo = np.full(blocks, np.inf)
    hi = np.full(blocks, -np.inf)
    bad = np.zeros(blocks)
    for b in numba.prange(blocks):
        low, high, z = np.float32(np.inf), np.float32(-np.inf), np.float32(0.0)
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            x = w[i]
            low = min(low, x)
            high = max(high, x)
            z += x - x
        lo[b], hi[b], bad[b] = low, high, z
    return lo.min(), hi.max(), np.isfinite(bad.sum())


@njit(nogil=True)
def table_gradients(
    x0: float, h: float, points: int, mu: np.ndarray, lam: np.ndarray, c: np.ndarray, tolerance: float
) -> tuple[np.ndarray, np.ndarray]:
    """``d NLL / d w`` at the grid points ``x0 + k h`` (float32, as the weights' gradients), and
    which cells between them interpolate to within ``tolerance`` times the largest gradient at
    their quarter points: a cell where the gradient turns sharply (between two narrow
    components far apart it flips sign over much less than a cell) is left to the exact path."""
    j_count = mu.shape[0]
    exact = np.empty(points)
    acc = np.zeros((4, j_count))
    e = np.empty(j_count)
    for k in range(points):
        exact[k] = _exact_one(x0 + k * h, mu, lam, c, acc, e)
    bound = tolerance * np.abs(exact).max()
    smooth = np.ones(points, np.bool_)
    smooth[points - 1] = False
    for k in range(points - 1):
        for q in (0.25, 0.5, 0.75):
            mid = _exact_one(x0 + (k + q) * h, mu, lam, c, acc, e)
            if not abs(mid - (exact[k] + q * (exact[k + 1] - exact[k]))) <= bound:
                smooth[k] = False
                break
    return exact.astype(np.float32), smooth


@njit(parallel=True, nogil=True)
def table_pass(
    w: np.ndarray, x0: float, inv_h: float, table: np.ndarray, smooth: np.ndarray, gw: np.ndarray, scale: float,
    accumulate: bool, threads: int, mu: np.ndarray, lam: np.ndarray, c: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """Interpolated gradients into ``gw`` (or added, times ``scale``); returns the weights'
    shares of each grid point (in units of 1/TABLE_ONE), the exact ``acc`` terms of the weights
    the table does not serve (outside the grid, in a cell that is not ``smooth``, or not
    finite: they take ``_exact_one``) and how many lay outside the grid. The exact terms are summed per fixed
    block of weights, then over the blocks in order: the same on any thread count. No
    fast-math flags: a NaN weight must fail the range test and reach the exact path.

    Each run of TABLE_RUN weights takes three loops: cells and fractions (vectorised), the
    gradients (a scalar gather; a cell that is not smooth has a NaN slope, so its weights show
    as NaN gradients), then one packed increment per weight of its cell's count and fraction.
    A run with a weight the table does not serve puts those weights' old gradients back and
    redoes them exactly, in order."""
    n = w.shape[0]
    points = table.shape[0]
    blocks = max((n + BLOCK - 1) // BLOCK, 1)
    slope = np.full(points, np.float32(np.nan))
    for k in range(points - 1):
        if smooth[k]:
            slope[k] = table[k + 1] - table[k]
    totals = np.zeros((threads, 2, points), np.int64)
    off = np.zeros((blocks, 4, mu.shape[0]))
    n_out = np.zeros(blocks, np.int64)
    base, step, s = np.float32(x0), np.float32(inv_h), np.float32(scale)
    last = np.float32(points - 1)
    per = (blocks + threads - 1) // threads
    for t in numba.prange(threads):
        cells = np.empty(TABLE_RUN, np.uint32)
        frac = np.empty(TABLE_RUN, np.float32)
        old = np.empty(TABLE_RUN, np.float32)
        packed = np.zeros((_ROWS, points), np.int64)
        e = np.empty(mu.shape[0])
        start, stop = t * per * BLOCK, min(n, (t + 1) * per * BLOCK)
        since = 0
        for r0 in range(start, stop, TABLE_RUN):
            m = min(TABLE_RUN, stop - r0)
            x = w[r0:r0 + m]
            y = gw[r0:r0 + m]
            served = 0
            for j in range(m):
                pos = (x[j] - base) * step
                inside = (pos >= _ZERO) & (pos < last)
                k = np.uint32(pos if inside else _ZERO)
                cells[j] = k
                frac[j] = pos - np.float32(k)
                served += np.int64(inside)
            for j in range(m):
                k = cells[j]
                g = _fma(frac[j], slope[k], table[k])
                o = y[j]
                old[j] = o
                y[j] = _fma(s, g, o) if accumulate else g
                served += np.int64(g == g)
            if served == 2 * m:
                for j in range(m):
                    packed[j & (_ROWS - 1), cells[j]] += _PACK_ONE + np.int64(frac[j] * _TABLE_ONE_F + _HALF)
            else:
                b = r0 // BLOCK
                for j in range(m):
                    pos = (x[j] - base) * step
                    inside = (pos >= _ZERO) & (pos < last)
                    k = cells[j]
                    if inside and slope[k] == slope[k]:
                        packed[j & (_ROWS - 1), k] += _PACK_ONE + np.int64(frac[j] * _TABLE_ONE_F + _HALF)
                    else:
                        g = np.float32(_exact_one(np.float64(x[j]), mu, lam, c, off[b], e))
                        if not inside:
                            n_out[b] += 1
                        y[j] = _fma(s, g, old[j]) if accumulate else g
            since += m
            if since >= _PACK_FLUSH or r0 + TABLE_RUN >= stop:
                for r in range(_ROWS):
                    for k in range(points):
                        v = packed[r, k]
                        if v != 0:
                            totals[t, 0, k] += v >> _PACK_SHIFT
                            totals[t, 1, k] += v & (_PACK_ONE - 1)
                            packed[r, k] = 0
                since = 0
    tot = totals.sum(axis=0)
    counts = TABLE_ONE * tot[0] - tot[1]
    counts[1:] += tot[1][:-1]
    return counts, off.sum(axis=0), n_out.sum()


@njit(nogil=True)
def table_sums(x0: float, h: float, counts: np.ndarray, mu: np.ndarray, lam: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The kernels' ``acc`` (see :func:`nll_and_grads`) from the binned weights: each grid
    point's exact terms times its share of weights."""
    j_count = mu.shape[0]
    acc = np.zeros((4, j_count))
    one = np.zeros((4, j_count))
    e = np.empty(j_count)
    for k in range(counts.shape[0]):
        if counts[k] == 0:
            continue
        one[:] = 0.0
        _exact_one(x0 + k * h, mu, lam, c, one, e)
        for r in range(4):
            for j in range(j_count):
                acc[r, j] += (counts[k] / TABLE_ONE) * one[r, j]
    return acc
