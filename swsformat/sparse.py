"""Inference on sparse CSR weights: drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

Conv layers run as an honest sparse matmul of the flattened kernel (out x in*kh*kw) with the
unfolded input (im2col), so both layer types use the same CSR kernels of torch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D CSR view ``(shape[0], prod(shape[1:]))`` of a dense weight."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:])).to_sparse_csr()


def _weight_csr(weight: torch.Tensor, csr: torch.Tensor | None) -> torch.Tensor:
    """``csr`` (already decoded, e.g. by the file's CSR decoder) in the weight's dtype and
    device, else the weight converted."""
    if csr is None:
        return to_csr(weight)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return csr.to(device=weight.device, dtype=weight.dtype)


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as CSR."""

    def __init__(self, linear: nn.Linear, csr: torch.Tensor | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", _weight_csr(linear.weight, csr))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        y = torch.sparse.mm(self.weight, flat.t()).t()
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)


class SparseConv2d(nn.Module):
    """2-D convolution as CSR(out, in*kh*kw) @ im2col(x); groups must be 1."""

    def __init__(self, conv: nn.Conv2d, csr: torch.Tensor | None = None) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d supports groups=1, zero padding given as numbers")
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        # The kernel's own shape: encode() of the model writes the weight back in it.
        self.dense_shape = tuple(conv.weight.shape)
        self.register_buffer("weight", _weight_csr(conv.weight, csr))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        b, _, h, w = x.shape
        cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, K, L)
        k, length = cols.shape[1], cols.shape[2]
        y = torch.sparse.mm(self.weight, cols.permute(1, 0, 2).reshape(k, b * length))
        y = y.reshape(self.out_channels, b, length).permute(1, 0, 2)
        if self.bias is not None:
            y = y + self.bias[None, :, None]
        oh = (h + 2 * self.padding[0] - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        ow = (w + 2 * self.padding[1] - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        return y.reshape(b, self.out_channels, oh, ow)


# torch's CSR matmul exists for these dtypes on each device type (on CPU the MKL kernel has
# no float16/bfloat16: such layers fail at their first forward).
CSR_DTYPES = {
    "cpu": {torch.float32, torch.float64},
    "cuda": {torch.float16, torch.bfloat16, torch.float32, torch.float64},
}

# Largest weight density (non-zeros / elements) at which CSR beat dense for every measured
# layer shape, by device type and batch size: benchmarks/sparse_crossover.json, made by
# ``python benchmarks/sparse_crossover.py --threads 1 2`` (the stricter of 1 and 2 threads).
# A device type or batch that was never measured keeps dense layers under ``sparse="auto"``.
# Measured on a 2-core x86_64 VM with torch 2.13 (1 thread: 0.05/0.3/0.2/0.1, 2 threads:
# 0.1/0.3/0.2/0.1 at batch 1/16/64/256). CUDA is not measured yet: benchmarks/gpu_sparse.py.
CROSSOVER: dict[str, dict[int, float]] = {
    "cpu": {1: 0.05, 16: 0.3, 64: 0.2, 256: 0.1},
}


def crossover_density(device_type: str, batch_size: int) -> float:
    """The measured crossover for the nearest measured batch size not above ``batch_size``."""
    table = CROSSOVER.get(device_type, {})
    sizes = sorted(b for b in table if b <= max(batch_size, 1))
    return table[sizes[-1]] if sizes else 0.0


def unsupported(layer: nn.Module, device_type: str) -> str | None:
    """Why ``layer`` cannot run on CSR weights on this device type (None: it can)."""
    if layer.weight.numel() == 0:
        return "empty weight"
    if layer.weight.dtype not in CSR_DTYPES.get(device_type, set()):
        return f"no CSR matmul for {layer.weight.dtype} on {device_type}"
    if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        return "conv with groups, non-zero padding mode or string padding"
    if layer._forward_pre_hooks or layer._forward_hooks:
        return "forward hooks (e.g. nn.utils.weight_norm) that set or read its weight"
    return None


def sparsify_(
    module: nn.Module, mode: bool | str = True, batch_size: int = 1, prefix: str = "",
    csr: Callable[[str], torch.Tensor | None] | None = None,
) -> dict[str, str]:
    """Replace ``nn.Linear`` and ``nn.Conv2d`` layers in place by their CSR versions.

    ``mode=True`` converts every layer that has a correct CSR kernel on its device;
    ``mode="auto"`` only those whose weight density is at most the measured crossover for the
    device and ``batch_size`` (see :data:`CROSSOVER`). ``csr(weight name)`` may supply the
    CSR weight already decoded. Returns ``{layer: "csr" or why dense}``, ``""`` naming the
    model itself. A layer whose weight another layer shares stays dense (the tie holds), and
    so does a model that is itself one layer (no parent can swap it).
    """
    report: dict[str, str] = {}
    if not prefix:  # the model itself, which no parent can swap
        if isinstance(module, _READS_WEIGHTS):
            return _kept_dense(module, "", f"inside {type(module).__name__}, whose fused path reads the weights")
        if type(module) in (nn.Linear, nn.Conv2d):
            return {"": f"dense: the model is itself an nn.{type(module).__name__}; wrap it in nn.Sequential to run "
                        "it on CSR"}
        if _own_matrices(module):
            report[""] = f"dense: no CSR version of {type(module).__name__}"
    return report | _sparsify(module, mode, batch_size, prefix, csr, _tied_weights(module), {})


def _sparsify(
    module: nn.Module, mode: bool | str, batch_size: int, prefix: str,
    csr: Callable[[str], torch.Tensor | None] | None, tied: set[int], done: dict[int, tuple[nn.Module, str]],
) -> dict[str, str]:
    """``done`` maps a layer already visited (by id) to its replacement and report: a layer
    registered under two names (``self.alias = self.block``) is swapped under both."""
    report: dict[str, str] = {}
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        full = f"{prefix}{name}"
        if id(child) in done:
            new, why = done[id(child)]
            if new is not child:
                setattr(module, name, new)
            if why:
                report[full] = why
            continue
        if isinstance(child, _READS_WEIGHTS):
            # Their fused inference path reads the sublayers' weights as dense tensors.
            report.update(_kept_dense(child, full, f"inside {type(child).__name__}, whose fused path reads the weights"))
        elif isinstance(child, nn.Linear | nn.Conv2d) and type(child) in (nn.Linear, nn.Conv2d):
            device_type = child.weight.device.type
            why = unsupported(child, device_type)
            if why is None and id(child.weight) in tied:
                why = "its weight is tied to another layer's (a CSR copy would break the tie)"
            if why is None and mode == "auto":
                density = float(child.weight.count_nonzero()) / max(child.weight.numel(), 1)
                limit = crossover_density(device_type, batch_size)
                if density > limit:
                    why = f"density {density:.4g} above the measured crossover {limit:.4g} ({device_type}, batch {batch_size})"
            if why is None:
                given = csr(f"{full}.weight") if csr is not None else None
                cls = SparseLinear if isinstance(child, nn.Linear) else SparseConv2d
                new = cls(child, given)
                setattr(module, name, new)
                report[full] = "csr"
                done[id(child)] = (new, "csr")
            else:
                report[full] = f"dense: {why}"
                done[id(child)] = (child, report[full])
        else:
            if _own_matrices(child):
                report[full] = f"dense: no CSR version of {type(child).__name__}"
            done[id(child)] = (child, "")
            report.update(_sparsify(child, mode, batch_size, f"{full}.", csr, tied, done))
    return report


def _tied_weights(module: nn.Module) -> set[int]:
    """ids of the parameters that more than one layer holds (GPT-2's ``lm_head`` and ``wte``)."""
    seen: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


# Layers whose inference fast path reads their sublayers' weights directly (a CSR weight breaks it).
_READS_WEIGHTS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def _own_matrices(layer: nn.Module) -> bool:
    """Whether ``layer`` holds weight matrices of its own (not its children's)."""
    return any(p.dim() >= 2 and p.numel() for p in layer.parameters(recurse=False))


def _kept_dense(layer: nn.Module, name: str, why: str) -> dict[str, str]:
    """``{name: "dense: why"}`` for ``layer`` and every weight-holding layer inside it."""
    return {".".join(filter(None, (name, n))): f"dense: {why}" for n, m in layer.named_modules() if _own_matrices(m)}
