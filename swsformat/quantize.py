"""Post-training quantization for ordinary checkpoints: magnitude pruning + 1-D k-means.

The soft weight-sharing retraining is the better route; this path lets any trained model
be written as ``.sws`` (``sws encode model.pt --prune 0.9 --clusters 16``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from .encoder import default_selector, tie_key


def kmeans_1d(values: np.ndarray, k: int, iters: int = 30, init: str = "quantile") -> np.ndarray:
    """Lloyd's k-means on a 1-D sample; returns sorted centres. ``init="quantile"`` starts at
    quantiles (dense regions get more values), ``"linear"`` evenly over [min, max], which keeps
    the rare large weights well represented (Deep Compression's measured best)."""
    if values.size == 0:
        return np.zeros(0)
    if init == "linear":
        centres = np.unique(np.linspace(values.min(), values.max(), k))
    elif init == "quantile":
        centres = np.unique(np.quantile(values, (np.arange(k) + 0.5) / k))
    else:
        raise ValueError(f"init must be 'quantile' or 'linear', got {init!r}")
    for _ in range(iters):
        edges = (centres[1:] + centres[:-1]) / 2
        idx = np.searchsorted(edges, values)
        sums = np.bincount(idx, weights=values, minlength=centres.size)
        counts = np.bincount(idx, minlength=centres.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(new, centres):
            break
        centres = new
    return np.unique(centres)


def snap(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each value replaced by its nearest centre (``centres`` sorted)."""
    edges = (centres[1:] + centres[:-1]) / 2
    return centres[np.searchsorted(edges, values)]


def keep_mask(magnitudes: np.ndarray, prune: float) -> np.ndarray:
    """True for the ``1 - prune`` fraction of entries with the largest magnitude (at least one
    when anything is kept), by rank: ties cannot wipe a layer as a threshold would."""
    n = magnitudes.size
    keep = n - int(np.floor(prune * n))
    mask = np.zeros(n, dtype=bool)
    if keep >= n:
        mask[:] = True
    elif keep > 0:
        mask[np.argpartition(magnitudes, n - keep)[n - keep:]] = True
    return mask


def magnitude_masks(
    values: Mapping[str, np.ndarray], prune: float, prune_scope: str = "model", min_layer_keep: float = 0.25
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Keep-masks (flat) pruning ``prune`` of the weights by magnitude, and the layers whose
    share the floor raised (see :func:`prune_and_cluster` for the scopes)."""
    floored: list[str] = []
    if prune_scope == "model":
        flat = np.concatenate(list(values.values()))
        mask = keep_mask(np.abs(flat), prune)
        masks = dict(zip(values, np.split(mask, np.cumsum([v.size for v in values.values()])[:-1])))
        for n, v in values.items():
            floor = int(np.ceil(min_layer_keep * (1.0 - prune) * v.size))
            if masks[n].sum() < floor:
                masks[n] = keep_mask(np.abs(v), 1.0 - floor / v.size)
                floored.append(n)
    else:
        masks = {n: keep_mask(np.abs(v), prune) for n, v in values.items()}
    return masks, floored


@torch.no_grad()
def prune_and_cluster(
    state_dict: Mapping[str, torch.Tensor],
    prune: float = 0.9,
    clusters: int = 16,
    per_layer: bool = False,
    prune_scope: str = "model",
    min_layer_keep: float = 0.25,
) -> dict[str, torch.Tensor]:
    """Zero the ``prune`` fraction of smallest-magnitude weights, cluster the rest to
    ``clusters`` values.

    Applies to the tensors :func:`swsformat.encoder.default_selector` picks (conv, linear,
    embedding, RNN and attention weights). ``prune_scope="model"`` ranks all their weights
    together, so big redundant layers lose more than small ones (a 784-256-64-10 MLP at 90%:
    26.5% test error, against 77.2% pruning every layer by 90%), but no layer keeps fewer than
    ``min_layer_keep`` times the target share of its weights (with a codebook of its own): one
    threshold alone wipes layers whose weights are small, e.g. every GPT-2 ``c_proj``. ``prune_scope="layer"`` prunes every
    layer by ``prune``. With ``per_layer=False`` one codebook is shared by the whole model, as
    in soft weight-sharing. Returns a new state_dict; other tensors are passed through.
    """
    from .errors import SwsEncodeError

    if not 0.0 <= prune < 1.0:
        raise ValueError(f"prune must be in [0, 1), got {prune}")
    if not 1 <= clusters <= 255:
        raise ValueError(f"clusters must be in [1, 255], got {clusters}")
    if prune_scope not in ("model", "layer"):
        raise ValueError(f"prune_scope must be 'model' or 'layer', got {prune_scope!r}")
    if not 0.0 <= min_layer_keep <= 1.0:
        raise ValueError(f"min_layer_keep must be in [0, 1], got {min_layer_keep}")
    # A tensor tied under several names (GPT-2's wte and lm_head) is ranked and clustered once,
    # and every name gets the same result tensor, so the tie survives into the file.
    first: dict[tuple, str] = {}
    ties: dict[str, str] = {}
    names = []
    for n, t in state_dict.items():
        if not default_selector(n, t):
            continue
        key = tie_key(t)
        if t.numel() and key in first:
            ties[n] = first[key]
        else:
            first[key] = n
            names.append(n)
    out = dict(state_dict)
    if not names:
        return out
    values = {n: state_dict[n].detach().cpu().double().numpy().ravel() for n in names}
    for n, v in values.items():
        if not np.isfinite(v).all():
            bad = int(np.count_nonzero(~np.isfinite(v)))
            raise SwsEncodeError(f"tensor {n!r} holds {bad} NaN or infinite values; fix the checkpoint before quantizing it")
    masks, floored = magnitude_masks(values, prune, prune_scope, min_layer_keep)
    # A layer the floor saved has weights of another scale than the model's: the shared
    # codebook would snap them to values far from their own, so it gets its own codebook.
    shared = [n for n in names if n not in floored]
    groups = [[n] for n in names] if per_layer else ([shared] if shared else []) + [[n] for n in floored]
    rng = np.random.default_rng(0)
    for group in groups:
        kept = np.concatenate([values[n][masks[n]] for n in group])
        sample = kept if kept.size <= 1_000_000 else rng.choice(kept, 1_000_000, replace=False)
        centres = kmeans_1d(sample, clusters)
        for n in group:
            t = state_dict[n]
            q = np.where(masks[n], snap(values[n], centres) if centres.size else 0.0, 0.0)
            out[n] = torch.from_numpy(q.reshape(tuple(t.shape))).to(t.dtype).to(t.device)
    for n, target in ties.items():
        out[n] = out[target]
    return out
