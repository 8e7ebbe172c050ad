"""The library's own loop (``compress``) under ``torchrun``: one writer, one decision.

Every rank runs the same steps on its own batches (DDP averages the gradients through the
user's ``loss_fn``); what must not differ between ranks is decided once: files and checkpoints
are written by rank 0 alone, and a choice measured on each rank's own data (whether rounding
the biases costs accuracy) is taken only if every rank agrees. Without an initialized
process group every function here is the single-process case.
"""

from __future__ import annotations

import torch


def _group_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def distributed() -> bool:
    """Whether several processes run this job together."""
    return _group_size() > 1


def is_writer() -> bool:
    """Rank 0, or the only process: the one that writes files."""
    import torch.distributed as dist

    return not distributed() or dist.get_rank() == 0


def all_agree(ok: bool) -> bool:
    """True only if ``ok`` holds on every rank."""
    if not distributed():
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def from_writer(value: int | None) -> int | None:
    """Rank 0's ``value`` on every rank (e.g. the size of the file it wrote)."""
    if not distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def set_epoch(data: object, epoch: int) -> None:
    """Tell a DataLoader's ``DistributedSampler`` (anything with ``set_epoch``) which epoch
    starts, so that every epoch, and a resumed one, draws its own order on every rank."""
    sampler = getattr(data, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
