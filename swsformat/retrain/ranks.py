"""The library's own loop (``compress(..., distributed=True)``) under ``torchrun``: one
writer, one decision.

Every rank runs the same steps on its own batches (DDP averages the gradients through the
user's ``loss_fn``); what must not differ between ranks is decided once: files and checkpoints
are written by rank 0 alone, buffers (BatchNorm statistics) are taken from rank 0 before
anything is measured, and a choice measured on each rank's own data (whether rounding the
biases costs accuracy) is taken only if every rank agrees. ``group=None`` is the
single-process case: no collective is ever called.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def reduce_device(group: Any = None) -> torch.device:
    """Where a collective's tensor must live for ``group``'s backend: NCCL takes CUDA tensors only."""
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")


def world(distributed: bool) -> Any:
    """The process group ``compress`` works over: the default one when ``distributed``, else None."""
    if not distributed:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        from ..errors import SwsTrainingError

        raise SwsTrainingError("distributed=True needs an initialized process group (torchrun and "
                           "torch.distributed.init_process_group) before compress()")
    return dist.group.WORLD


def is_writer(group: Any) -> bool:
    """Rank 0 of ``group``, or the only process: the one that writes files."""
    import torch.distributed as dist

    return group is None or dist.get_rank(group) == 0


def all_agree(ok: bool, group: Any) -> bool:
    """True only if ``ok`` holds on every rank of ``group``."""
    if group is None:
        return ok
    import torch.distributed as dist

    flag = torch.tensor([1 if ok else 0], dtype=torch.int64, device=reduce_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(flag.item())


def from_writer(value: Any, error: BaseException | None, group: Any) -> Any:
    """Rank 0's ``value`` on every rank; if rank 0 failed (``error``), every rank raises, so
    none is left waiting for a rank that gave up."""
    if group is None:
        if error is not None:
            raise error
        return value
    import torch.distributed as dist

    box = [(value, None if error is None else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0), group=group)
    value, message = box[0]
    if error is not None:
        raise error
    if message is not None:
        from ..errors import SwsTrainingError

        raise SwsTrainingError(f"rank 0 failed: {message}")
    return value


def from_writer_tensors(tensors: Iterable[torch.Tensor], group: Any) -> None:
    """Overwrite ``tensors`` in place with rank 0's on every rank of ``group``."""
    if group is None:
        return
    import torch.distributed as dist

    src = dist.get_global_rank(group, 0)
    for t in tensors:
        dist.broadcast(t.data, src=src, group=group)


def sync_buffers(model: nn.Module, group: Any) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank: DDP only syncs them at
    the next forward, so after a training phase each rank still holds its own last batch's."""
    from_writer_tensors(model.buffers(), group)


def world_size(group: Any) -> int:
    import torch.distributed as dist

    return 1 if group is None else dist.get_world_size(group)


def check_same_model(model: nn.Module, group: Any) -> None:
    """Raise unless every rank holds rank 0's weights (the file holds rank 0's): a checksum,
    its maximum and minimum over the ranks."""
    if group is None:
        return
    import torch.distributed as dist

    from ..errors import SwsTrainingError

    with torch.no_grad():
        total = sum(float(t.double().abs().sum()) for t in model.state_dict().values() if t.is_floating_point())
    sums = torch.tensor([total, -total], dtype=torch.float64, device=reduce_device(group))
    dist.all_reduce(sums, op=dist.ReduceOp.MAX, group=group)
    if float(sums[0]) != -float(sums[1]):
        raise SwsTrainingError("the processes ended with different weights (the file holds rank 0's): a rank "
                               "trained on something the others did not see")


def set_epoch(data: object, epoch: int) -> None:
    """Tell a DataLoader's ``DistributedSampler`` (anything with ``set_epoch``: its sampler,
    batch sampler or dataset) which epoch starts, so that every epoch, and a resumed one,
    draws its own order on every rank."""
    for owner in (getattr(data, "sampler", None), getattr(data, "batch_sampler", None), getattr(data, "dataset", None)):
        if hasattr(owner, "set_epoch"):
            owner.set_epoch(epoch)
            return
