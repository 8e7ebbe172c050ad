"""Post-training quantization for ordinary checkpoints: magnitude pruning + 1-D k-means.

The soft weight-sharing retraining is the better route; this path lets any trained model
be written as ``.sws`` (``sws encode model.pt --prune 0.9 --clusters 16``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .encoder import _state_dict, group_coded, in_order, kept_names, tie_groups
from .errors import SwsEncodeError, where
from .kernels import jit
from .selection import Compress, selector


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
    wide = np.ascontiguousarray(values, dtype=np.float64).reshape(-1)
    for _ in range(iters):
        edges = (centres[1:] + centres[:-1]) / 2
        sums = np.zeros(centres.size)
        counts = np.zeros(centres.size, dtype=np.int64)
        _assign(wide, edges, sums, counts)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(new, centres):
            break
        centres = new
    return np.unique(centres)


@jit
def _cluster_of(edges: np.ndarray, v: float) -> int:
    """``np.searchsorted(edges, v)`` for sorted ``edges``: how many lie below ``v`` (NaN after
    all). Up to 32 edges a count without branches beats a binary search (3x at 15 edges)."""
    n = edges.size
    if v != v:
        return n
    if n <= 32:
        below = 0
        for j in range(n):
            below += edges[j] < v
        return below
    lo, hi = 0, n
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@jit
def _assign(values: np.ndarray, edges: np.ndarray, sums: np.ndarray, counts: np.ndarray) -> None:
    """Lloyd's assignment step in one pass: each value's cluster is ``searchsorted(edges, v)``
    (NaN last, as numpy sorts it), and its sums and counts are added in order, so the result is
    bit for bit that of ``np.bincount``."""
    for k in range(values.size):
        v = values[k]
        i = _cluster_of(edges, v)
        sums[i] += v
        counts[i] += 1


@jit
def _snap_kept(values: np.ndarray, keep: np.ndarray, edges: np.ndarray, centres: np.ndarray, out: np.ndarray) -> None:
    """``out = where(keep, snap(values, centres), 0)`` in one pass (no centres: all zero)."""
    if centres.size == 0:
        out[:] = 0.0
        return
    for k in range(values.size):
        out[k] = centres[_cluster_of(edges, np.float64(values[k]))] if keep[k] else 0.0


def snap(values: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Each value replaced by its nearest centre (``centres`` sorted)."""
    edges = (centres[1:] + centres[:-1]) / 2
    return centres[np.searchsorted(edges, values)]


# Work on weights in chunks of this many values: temporaries stay a few MB whatever the model
# (one thread per tensor, ~20 bytes per value each; 1 << 20 added 40 MB to the peak of
# quantizing a 20M-weight LSTM, 1 << 18 adds 6 MB at the same speed).
CHUNK = 1 << 18
# k-means runs on at most about this many kept weights (a fixed random subset beyond).
KMEANS_SAMPLE = 1_000_000


def _as_tensor(v: np.ndarray | torch.Tensor) -> torch.Tensor:
    return v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))


def _chunks(t: torch.Tensor, wide: bool):
    """The flat values of ``t`` as float64 (``wide``) or float32 numpy chunks (views where the
    tensor already is that dtype on the CPU)."""
    flat = t.detach().reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        c = flat[s : s + CHUNK]
        yield (c.double() if wide else c.float()).cpu().numpy()


def _magnitude_bits(chunk: np.ndarray) -> np.ndarray:
    """``|chunk|`` as unsigned integers that sort as the magnitudes do (IEEE bits of a
    non-negative float)."""
    return np.abs(chunk).view(np.uint64 if chunk.dtype == np.float64 else np.uint32)


def _wide(tensors: list[torch.Tensor]) -> bool:
    return any(t.dtype == torch.float64 for t in tensors)


def _rank_threshold(tensors: list[torch.Tensor], keep: int, wide: bool) -> tuple[int, int]:
    """Radix selection of the ``keep``-th largest magnitude over all ``tensors`` without
    sorting or concatenating them: 16 bits of its pattern per pass over the chunks. Returns
    the pattern and how many entries equal to it are kept (``0 < keep <= total``)."""
    width = 64 if wide else 32
    prefix, done, need = 0, 0, keep
    while done < width:
        shift = width - done - 16
        hist = np.zeros(1 << 16, np.int64)
        for t in tensors:
            for c in _chunks(t, wide):
                b = _magnitude_bits(c)
                if done:
                    b = b[(b >> (width - done)) == prefix]
                hist += np.bincount(((b >> shift) & 0xFFFF).astype(np.intp), minlength=1 << 16)
        from_top = np.cumsum(hist[::-1])
        i = int(np.searchsorted(from_top, need))
        digit = (1 << 16) - 1 - i
        need -= int(from_top[i] - hist[digit])
        prefix = (prefix << 16) | digit
        done += 16
    return prefix, need


@dataclass(frozen=True)
class _Cut:
    """Which entries of one tensor are kept: magnitudes whose bit pattern exceeds ``bits``,
    and the first ``ties`` entries equal to it; ``kept`` of them in all."""

    bits: int
    ties: int
    wide: bool
    kept: int
    everything: bool | None = None  # True / False: keep all / none, whatever the values


def _cuts(tensors: list[torch.Tensor], prune: float) -> list[_Cut]:
    """Per tensor, the rule keeping the ``1 - prune`` share of all ``tensors``' entries with the
    largest magnitude (at least one when anything is kept), ranked together; entries of equal
    magnitude at the cut are kept in order, first tensor first."""
    total = sum(t.numel() for t in tensors)
    keep = total - int(np.floor(prune * total))
    wide = _wide(tensors)
    if keep >= total or keep <= 0:
        return [_Cut(0, 0, wide, _nonzeros(t, wide) if keep > 0 else 0, keep > 0) for t in tensors]
    bits, ties = _rank_threshold(tensors, keep, wide)
    cuts = []
    for t in tensors:  # one pass: how many lie above the cut, how many on it
        above = equal = 0
        for c in _chunks(t, wide):
            b = _magnitude_bits(c)
            above += int(np.count_nonzero(b > bits))
            equal += int(np.count_nonzero(b == bits))
        taken = min(equal, ties) if bits else 0  # an exact zero is never kept
        cuts.append(_Cut(bits, taken, wide, above + taken))
        ties -= taken
    return cuts


def _nonzeros(t: torch.Tensor, wide: bool) -> int:
    return sum(int(np.count_nonzero(c)) for c in _chunks(t, wide))


def _masked(t: torch.Tensor, cut: _Cut):
    """``t``'s flat values in chunks (as :func:`_chunks`) with their keep-masks; an exact
    zero is never kept (a pruned or zero-initialised weight stays zero)."""
    ties = cut.ties
    for c in _chunks(t, cut.wide):
        if cut.everything is not None:
            yield c, (c != 0) if cut.everything else np.zeros(c.size, bool)
            continue
        b = _magnitude_bits(c)
        mask = b > cut.bits
        if ties:
            equal = np.flatnonzero(b == cut.bits)[:ties]
            mask[equal] = True
            ties -= equal.size
        yield c, mask


def _keep_masks(tensors: list[torch.Tensor], prune: float) -> list[np.ndarray]:
    """Flat keep-masks of :func:`_cuts`."""
    return [np.concatenate([m for _, m in _masked(t, cut)] or [np.zeros(0, bool)])
            for t, cut in zip(tensors, _cuts(tensors, prune))]


def _layer_cuts(
    tensors: Mapping[str, torch.Tensor], prune: float, prune_scope: str, min_layer_keep: float
) -> tuple[dict[str, _Cut], list[str]]:
    """The keep rule of every tensor (see :func:`prune_and_cluster` for the scopes) and the
    layers whose share the floor raised."""
    floored: list[str] = []
    if prune_scope != "model":
        return {n: _cuts([t], prune)[0] for n, t in tensors.items()}, floored
    cuts = dict(zip(tensors, _cuts(list(tensors.values()), prune)))
    for n, t in tensors.items():
        floor = int(np.ceil(min_layer_keep * (1.0 - prune) * t.numel()))
        if floor and cuts[n].kept < floor:
            cuts[n] = _cuts([t], 1.0 - floor / t.numel())[0]
            floored.append(n)
    return cuts, floored


def keep_mask(magnitudes: np.ndarray | torch.Tensor, prune: float) -> np.ndarray:
    """True for the ``1 - prune`` fraction of entries with the largest magnitude (at least one
    when anything is kept), by rank: ties cannot wipe a layer as a threshold would. Exact
    zeros are never kept, so fewer are where there are not that many non-zeros."""
    return _keep_masks([_as_tensor(magnitudes)], prune)[0]


def magnitude_masks(
    values: Mapping[str, np.ndarray | torch.Tensor], prune: float, prune_scope: str = "model",
    min_layer_keep: float = 0.25,
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Keep-masks (flat) pruning ``prune`` of the weights by magnitude, and the layers whose
    share the floor raised (see :func:`prune_and_cluster` for the scopes). Works chunk by
    chunk: no copy of the whole model, whatever its size."""
    tensors = {n: _as_tensor(v) for n, v in values.items()}
    cuts, floored = _layer_cuts(tensors, prune, prune_scope, min_layer_keep)
    return {n: np.concatenate([m for _, m in _masked(t, cuts[n])] or [np.zeros(0, bool)])
            for n, t in tensors.items()}, floored


def _distortion(values: np.ndarray, centres: np.ndarray) -> float:
    """RMS error of snapping ``values`` to ``centres``, relative to their RMS."""
    scale = float(np.sqrt(np.mean(values * values)))
    return float(np.sqrt(np.mean((values - snap(values, centres)) ** 2))) / scale if scale > 0 else 0.0


def _first_kept(t: torch.Tensor, cut: _Cut, limit: int = 1 << 14) -> np.ndarray:
    """Up to ``limit`` kept weights of ``t`` (float64), spread over its first chunk: a cheap probe."""
    for c, m in _masked(t, cut):
        v = c[m].astype(np.float64)
        return v[:: max(1, v.size // limit)]
    return np.zeros(0)


def _kmeans_sample(tensors: list[torch.Tensor], cuts: list[_Cut], rng: np.random.Generator) -> np.ndarray:
    """The kept weights (float64) of a group, or a fixed random subset of about
    KMEANS_SAMPLE of them when there are more, gathered chunk by chunk."""
    kept = sum(cut.kept for cut in cuts)
    share = min(1.0, KMEANS_SAMPLE / max(kept, 1))
    parts = []
    for t, cut in zip(tensors, cuts):
        for c, m in _masked(t, cut):
            v = c[m].astype(np.float64)
            parts.append(v if share >= 1.0 else v[rng.random(v.size) < share])
    return np.concatenate(parts) if parts else np.zeros(0)


def _kmeans(sample: np.ndarray, clusters: int) -> np.ndarray:
    """:func:`kmeans_1d`, on a rescaled sample where sums of the values could overflow float64."""
    scale = float(np.abs(sample).max()) if sample.size else 0.0
    if scale > 1e150:
        return kmeans_1d(sample / scale, clusters) * scale
    return kmeans_1d(sample, clusters)


def _overlapping(tensors: list[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` (each a distinct tie group) shares memory with another or
    with itself (a stride of 0 over more than one element)."""
    spans = []
    for t in tensors:
        if any(st == 0 and sz > 1 for st, sz in zip(t.stride(), t.shape)):
            return True
        if not t.numel():
            continue
        start = t.data_ptr()
        end = start + t.element_size() * (1 + sum((sz - 1) * abs(st) for sz, st in zip(t.shape, t.stride())))
        spans.append((t.untyped_storage().data_ptr(), start, end))
    spans.sort()
    return any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]))


def _would_wipe(t: torch.Tensor, cut: _Cut, centres: np.ndarray) -> bool:
    """Whether snapping ``t``'s kept values to ``centres`` leaves only zeros in its dtype."""
    if not cut.kept:
        return False
    zero = (torch.from_numpy(np.asarray(centres, dtype=np.float64)).to(t.dtype) == 0).numpy()
    if not zero.any():
        return False
    if zero.all():
        return True
    edges = (centres[1:] + centres[:-1]) / 2
    return not any(bool((~zero[np.searchsorted(edges, c[m])]).any()) for c, m in _masked(t, cut))


@torch.no_grad()
def prune_and_cluster(
    state_dict: Mapping[str, torch.Tensor] | nn.Module,
    prune: float = 0.9,
    clusters: int = 16,
    per_layer: bool = False,
    prune_scope: str = "model",
    min_layer_keep: float = 0.25,
    inplace: bool = False,
    keep: Iterable[str] = (),
    compress: Compress = None,
) -> dict[str, torch.Tensor]:
    """Zero the ``prune`` fraction of smallest-magnitude weights, cluster the rest to
    ``clusters`` values.

    Applies to the weights :func:`swsformat.selection.selector` picks: of a module, those of
    its conv, linear, embedding, RNN and attention layers by type; of a bare state_dict, the
    tensors named like them; ``compress`` (names or a ``(name, tensor) -> bool`` predicate)
    overrides that. ``prune_scope="model"`` ranks all their weights
    together, so big redundant layers lose more than small ones (a 784-256-64-10 MLP at 90%:
    26.5% test error, against 77.2% pruning every layer by 90%), but no layer keeps fewer than
    ``min_layer_keep`` times the target share of its weights (with a codebook of its own): one
    threshold alone wipes layers whose weights are small, e.g. every GPT-2 ``c_proj``. ``prune_scope="layer"`` prunes every
    layer by ``prune``. With ``per_layer=False`` one codebook is shared by the whole model, as
    in soft weight-sharing. Returns a new state_dict; other tensors are passed through.

    The work goes chunk by chunk in the weights' own dtype or float32 (float64 weights in
    float64): besides the masks (one byte per weight) it needs a few MB, plus the result
    tensors; with ``inplace=True`` the results are written into the given tensors instead
    (for a state_dict you own, e.g. one just loaded from a file). ``keep``: names or
    shell-style patterns of weights to leave as they are (see :func:`~swsformat.encoder.kept_names`).
    A module's own tensors are only changed with ``inplace=True``.
    """
    if not 0.0 <= prune < 1.0:
        raise SwsEncodeError(f"prune must be in [0, 1), got {prune}")
    if isinstance(clusters, bool) or not isinstance(clusters, int) or not 1 <= clusters <= 255:
        raise SwsEncodeError(f"clusters must be an integer in [1, 255], got {clusters!r}")
    if prune_scope not in ("model", "layer"):
        raise SwsEncodeError(f"prune_scope must be 'model' or 'layer', got {prune_scope!r}")
    if not 0.0 <= min_layer_keep <= 1.0:
        raise SwsEncodeError(f"min_layer_keep must be in [0, 1], got {min_layer_keep}")
    module = state_dict if isinstance(state_dict, nn.Module) else None
    held = module.state_dict() if module is not None else {}
    state_dict = _state_dict(state_dict)
    selected = selector(module if module is not None else state_dict, compress, state_dict)
    left = kept_names(keep, state_dict)
    # One tensor under several names (GPT-2's wte and lm_head) is one decision, as encode makes
    # it (group_coded); quantized once, every name gets the same result tensor, so the tie
    # survives into the file.
    group = tie_groups(state_dict)
    names: list[str] = []
    ties: dict[str, str] = {}
    for n, members in group.items():
        if n != members[0] or not group_coded(members, left, selected, state_dict):
            continue
        head = members[0]
        t = state_dict[head]
        if not t.is_floating_point():
            raise SwsEncodeError(f"{where(head)}is {t.dtype}, not floating point: only floating weights are quantized")
        if inplace and held.get(head, t).layout != torch.strided:
            raise SwsEncodeError(f"{where(head)}is held as {held[head].layout} (a model loaded with sparse=True): "
                                 "inplace=True cannot write into it; load the model dense, or use the returned state_dict")
        names.append(head)
        ties.update(dict.fromkeys(members[1:], head))
    out = dict(state_dict)
    if not names:
        return out
    if inplace and _overlapping([state_dict[n] for n in names]):
        # Views of one buffer (or an expanded tensor) snapped in place would be snapped again
        # through each other: such a state_dict is quantized out of place (the result is returned).
        if module is not None:
            raise SwsEncodeError("inplace=True: some of the module's weights share memory other than as ties (views of "
                                 "one buffer, or expanded tensors), so they cannot be quantized in place; use the "
                                 "returned state_dict (inplace=False)")
        inplace = False
    for n in names:  # chunk by chunk: torch.isfinite of a whole tensor takes 7 bytes per weight
        t = state_dict[n]
        if not all(np.isfinite(c).all() for c in _chunks(t, _wide([t]))):
            bad = sum(int(np.count_nonzero(~np.isfinite(c))) for c in _chunks(t, _wide([t])))
            raise SwsEncodeError(f"tensor {n!r} holds {bad} NaN or infinite values; fix the checkpoint before quantizing it")
    tensors = {n: state_dict[n] for n in names}
    cuts, floored = _layer_cuts(tensors, prune, prune_scope, min_layer_keep)
    # A layer the floor saved has weights of another scale than the model's: the shared
    # codebook would snap them to values far from their own, so it gets its own codebook.
    shared = [n for n in names if n not in floored]
    groups = [[n] for n in names] if per_layer else ([shared] if shared else []) + [[n] for n in floored]
    rng = np.random.default_rng(0)
    centres_of = {}
    for group in groups:
        centres = _kmeans(_kmeans_sample([tensors[n] for n in group], [cuts[n] for n in group], rng), clusters)
        centres_of.update(dict.fromkeys(group, centres))
    if len(shared) > 1 and not per_layer:
        # Without pruning no floor steps in, yet a layer of another scale (a 1e-3 layer in a
        # model of 0.1s) would still be snapped to values far from its own: it gets its own
        # codebook when the shared one distorts it badly and its own does much better.
        for n in shared:
            probe = _first_kept(tensors[n], cuts[n])
            if probe.size and _distortion(probe, centres_of[n]) > 0.5:
                own = _kmeans(_kmeans_sample([tensors[n]], [cuts[n]], rng), clusters)
                if 2 * _distortion(probe, own) < _distortion(probe, centres_of[n]):
                    centres_of[n] = own

    def snapped(n: str) -> torch.Tensor:
        t, centres = tensors[n], centres_of[n]
        target = t if inplace and t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
        flat, at = target.view(-1), 0
        edges = (centres[1:] + centres[:-1]) / 2
        for c, m in _masked(t, cuts[n]):
            chunk = np.empty(c.size)
            _snap_kept(c, m, edges, centres, chunk)
            flat[at : at + c.size] = torch.from_numpy(chunk)
            at += c.size
        if inplace and target is not t:  # e.g. a channels_last kernel: written back in its own layout
            with torch.no_grad():
                t.copy_(target)
            return t
        return target

    # Before anything is written (inplace=True changes the caller's tensors).
    wiped = [n for n in names if _would_wipe(tensors[n], cuts[n], centres_of[n])]
    if wiped:
        raise SwsEncodeError(f"clustering would leave {', '.join(map(repr, wiped))} all zero (every value it keeps "
                             "snaps to a value of 0 in its dtype); use more clusters (nothing was changed)")
    # One tensor per thread (numba's count; the kernel releases the GIL).
    out.update(zip(names, in_order([functools.partial(snapped, n) for n in names])))
    for n, target in ties.items():
        out[n] = out[target]
    return out
