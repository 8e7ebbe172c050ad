"""Fused numba kernel for the mixture negative log-likelihood and all of its gradients.

On a CPU the plain torch expression builds several (N, J) temporaries per step and
costs many times a LeNet training step; this kernel makes one pass over the weights and
evaluates ``exp`` only for the components within ``CUTOFF`` nats of the best one (the
others contribute less than float64 rounding), so the prior stays a small part of an epoch.
"""

from __future__ import annotations

import numba
import numpy as np

from ..kernels import njit

CUTOFF = 36.0
BLOCK = 16384


@njit(parallel=True, nogil=True)
def nll_and_grads(w: np.ndarray, mu: np.ndarray, lam: np.ndarray, c: np.ndarray, gw: np.ndarray) -> np.ndarray:
    """Return ``acc`` of shape (4, J): row 0 col 0 holds the NLL, rows 1-3 the sums
    ``sum_i r_ij lam_j (w_i - mu_j)``, ``sum_i r_ij lam_j (w_i - mu_j)^2 / 2`` and
    ``sum_i r_ij``; ``gw`` receives ``d NLL / d w``."""
    n = w.shape[0]
    j_count = mu.shape[0]
    blocks = (n + BLOCK - 1) // BLOCK
    partial = np.zeros((blocks, 4, j_count))
    for b in numba.prange(blocks):
        logits = np.empty(j_count)
        acc = partial[b]
        for i in range(b * BLOCK, min(n, (b + 1) * BLOCK)):
            wi = np.float64(w[i])
            best = -np.inf
            for j in range(j_count):
                d = wi - mu[j]
                v = c[j] - 0.5 * lam[j] * d * d
                logits[j] = v
                if v > best:
                    best = v
            total = 0.0
            for j in range(j_count):
                v = logits[j] - best
                if v > -CUTOFF:
                    e = np.exp(v)
                    logits[j] = e
                    total += e
                else:
                    logits[j] = 0.0
            acc[0, 0] -= best + np.log(total)
            g = 0.0
            inv = 1.0 / total
            for j in range(j_count):
                r = logits[j] * inv
                if r != 0.0:
                    d = wi - mu[j]
                    t = lam[j] * d
                    g += r * t
                    acc[1, j] += r * t
                    acc[2, j] += r * 0.5 * t * d
                    acc[3, j] += r
            gw[i] = g
    return partial.sum(axis=0)
