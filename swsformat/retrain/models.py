"""Which of a model's weights the mixture prior covers; the paper's MNIST architectures
themselves live in :mod:`swsformat.architectures`, where read paths find them."""

from __future__ import annotations

from torch import nn

from ..architectures import ARCHITECTURES as MODELS
from ..architectures import LeNet5Caffe, LeNet300100, TutorialNet, build_model
from ..selection import ATTENTION_WEIGHTS, WEIGHT_MODULES, FilterFn, default_filter

__all__ = [
    "ATTENTION_WEIGHTS",
    "MODELS",
    "WEIGHT_MODULES",
    "FilterFn",
    "LeNet300100",
    "LeNet5Caffe",
    "TutorialNet",
    "build_model",
    "compressible_parameters",
    "default_filter",
    "tied_names",
]


def compressible_parameters(model: nn.Module, filter_fn: FilterFn | None = None) -> list[tuple[str, nn.Parameter]]:
    """The weights the mixture prior covers, as ``(state_dict name, parameter)``, each shared
    (tied) parameter once under its first name. ``filter_fn(name, module, param)`` replaces
    :func:`default_filter` (``name`` is the parameter's name within ``module``)."""
    keep = filter_fn or default_filter
    seen: set[int] = set()
    out = []
    for mod_name, mod in model.named_modules():
        for name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not keep(name, mod, p):
                continue
            seen.add(id(p))
            out.append((f"{mod_name}.{name}" if mod_name else name, p))
    return out


def tied_names(model: nn.Module, params: list[nn.Parameter]) -> set[str]:
    """Every state_dict name under which any of ``params`` appears (tied weights have several)."""
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in ids}
