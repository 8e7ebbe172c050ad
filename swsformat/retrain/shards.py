"""Weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): each rank holds a shard.

The prior's gradient for a weight depends only on that weight and the mixture, so every rank
works on its own shard in place; what the mixture's gradient needs is a sum over all weights,
so the per-component sums of sharded tensors are all-reduced over the ranks that hold the
other shards. Plain tensors (and DDP, where every rank holds every weight) pass through.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .ranks import reduce_device

try:
    from torch.distributed.tensor import DTensor, Shard
except ImportError:  # torch builds without distributed support
    DTensor = Shard = None  # type: ignore[assignment,misc]


def is_sharded(t: torch.Tensor | None) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (a view: writing to it writes the parameter)."""
    return t.to_local() if is_sharded(t) else t


def shard_groups(t: torch.Tensor) -> tuple:
    """The process groups over which ``t``'s shards are spread (empty for a whole tensor)."""
    if not is_sharded(t):
        return ()
    mesh = t.device_mesh
    return tuple(mesh.get_group(d) for d, p in enumerate(t.placements) if isinstance(p, Shard))


def sum_over_shards(parts: Sequence[tuple[tuple, np.ndarray]]) -> np.ndarray:
    """Sum of per-tensor arrays, each first summed over the ranks holding that tensor's other
    shards (``parts``: (groups from :func:`shard_groups`, float64 array), all the same shape)."""
    import torch.distributed as dist

    total: np.ndarray | None = None
    pending: dict[tuple[int, ...], tuple[tuple, np.ndarray]] = {}
    for groups, arr in parts:
        if groups:
            key = tuple(id(g) for g in groups)
            have = pending.get(key)
            pending[key] = (groups, arr.copy() if have is None else have[1] + arr)
        else:
            total = arr.copy() if total is None else total + arr
    for groups, arr in pending.values():
        t = torch.from_numpy(arr)
        for g in groups:
            t = t.to(reduce_device(g))
            dist.all_reduce(t, group=g)
        summed = t.cpu().numpy()
        total = summed if total is None else total + summed
    if total is None:
        raise ValueError("nothing to sum")
    return total


def global_min_max(tensors: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Smallest and largest value over all ``tensors``, whole or sharded."""
    import torch.distributed as dist

    lo, hi = float("inf"), float("-inf")
    for t in tensors:
        part = local(t).detach()
        if part.numel():
            lo, hi = min(lo, float(part.min())), max(hi, float(part.max()))
    groups = {id(g): g for t in tensors for g in shard_groups(t)}
    if groups:
        both = torch.tensor([-lo, hi], dtype=torch.float64)
        for g in groups.values():
            both = both.to(reduce_device(g))
            dist.all_reduce(both, op=dist.ReduceOp.MAX, group=g)
        lo, hi = -float(both[0]), float(both[1])
    return lo, hi


def global_rms(tensors: Sequence[torch.Tensor]) -> float:
    """Root mean square over all ``tensors``, whole or sharded (0.0 when they are empty)."""
    parts = [(shard_groups(t), np.array([float(local(t).detach().double().square().sum()), local(t).numel()]))
             for t in tensors]
    if not parts:
        return 0.0
    squares, count = sum_over_shards(parts)
    return float(np.sqrt(squares / max(count, 1.0)))


def count_over_shards(tensors: Sequence[torch.Tensor], counts: Sequence[int]) -> list[int]:
    """``counts`` (one per tensor, taken over its local part) summed over each tensor's shards
    (one all-reduce per distinct set of groups)."""
    n = len(counts)
    parts = []
    for i, (t, c) in enumerate(zip(tensors, counts)):
        arr = np.zeros(n)
        arr[i] = float(c)
        parts.append((shard_groups(t), arr))
    if not parts:
        return []
    return [int(round(v)) for v in sum_over_shards(parts)]
