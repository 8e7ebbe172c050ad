"""Inference on sparse CSR weights: drop-in replacements for ``nn.Linear`` and ``nn.Conv2d``.

Conv layers run as an honest sparse matmul of the flattened kernel (out x in*kh*kw) with the
unfolded input (im2col), so both layer types use the same CSR kernels of torch.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn
from torch.nn import functional as F


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D CSR view ``(shape[0], prod(shape[1:]))`` of a dense weight."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return weight.detach().reshape(weight.shape[0], -1).to_sparse_csr()


class SparseLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` stored as CSR."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", to_csr(linear.weight))
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

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("SparseConv2d supports groups=1, zero padding given as numbers")
        self.out_channels = conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        self.padding, self.dilation = conv.padding, conv.dilation
        self.register_buffer("weight", to_csr(conv.weight))
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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


def sparsify_(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` and supported ``nn.Conv2d`` in place by its CSR version."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.Linear):
            setattr(module, name, SparseLinear(child))
        elif isinstance(child, nn.Conv2d) and child.groups == 1 and not isinstance(child.padding, str):
            setattr(module, name, SparseConv2d(child))
        else:
            sparsify_(child)
    return module
