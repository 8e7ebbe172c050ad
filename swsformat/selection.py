"""Which tensors are weights: by module type when the model is at hand, by name and shape
for a bare state_dict.

Quantization (``prune_and_cluster``), coding (``encode``) and the retraining prior all ask
the same question; answering it once keeps them from disagreeing about a tensor.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize

from .errors import SwsEncodeError
from .sparse import SparseConv2d, SparseLinear

# Module types whose ``weight`` is a weight matrix or kernel. transformers' GPT-2 ``Conv1D``
# is matched by class name, so that transformers need not be installed.
WEIGHT_MODULES: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Embedding, nn.EmbeddingBag, nn.Bilinear, SparseLinear, SparseConv2d,
)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

FilterFn = Callable[[str, nn.Module, torch.Tensor], bool]

# The last name part of weight matrices in a state_dict without its module: ``weight``
# (Linear, Conv, Embedding, Conv1D), ``weight_ih_l0``/``weight_hh_l1_reverse``/``weight_ih``/
# ``weight_hr_l0`` (RNN, LSTM with projections, GRU and their cells), ``in_proj_weight``/
# ``q_proj_weight`` (MultiheadAttention). Weight-norm magnitudes and directions stay raw.
_WEIGHT_NAME = re.compile(r"weight|weight_(?:ih|hh|hr)(?:_l\d+(?:_reverse)?)?|(?:in|q|k|v)_proj_weight")


def default_filter(name: str, module: nn.Module, param: torch.Tensor) -> bool:
    """Linear, conv, transposed conv, embedding and bilinear weights, RNN/LSTM/GRU gate
    matrices (layers and cells), attention input projections (its output projection is a
    Linear) and GPT-2's ``Conv1D``; never biases, norms, 1-D tensors or a custom module's
    own parameters (``name`` is the tensor's name within ``module``)."""
    if param.dim() < 2 or not param.is_floating_point():
        return False
    if isinstance(module, WEIGHT_MODULES) or type(module).__name__ == "Conv1D":
        return name == "weight"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return name.startswith("weight_")
    if isinstance(module, nn.MultiheadAttention):
        return name in ATTENTION_WEIGHTS
    return False


def is_weight_name(name: str) -> bool:
    """Whether a state_dict name's last part is one of the weight names above."""
    return bool(_WEIGHT_NAME.fullmatch(name.rsplit(".", 1)[-1]))


def default_selector(name: str, tensor: torch.Tensor) -> bool:
    """For a state_dict without its module: floating, at least 2-D, named like a weight."""
    return tensor.is_floating_point() and tensor.dim() >= 2 and is_weight_name(name)


def module_weights(model: nn.Module, filter_fn: FilterFn | None = None) -> set[str]:
    """The state_dict names of ``model``'s weights by module type (every name of a tied one);
    ``filter_fn(name, module, tensor)`` replaces :func:`default_filter`."""
    keep = filter_fn or default_filter
    picked: set[str] = set()
    derived: list[str] = []
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        tensors = list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False))
        for name, t in tensors:
            if t is not None and keep(name, mod, t):
                picked.add(f"{mod_name}.{name}" if mod_name else name)
        if filter_fn is None and isinstance(mod, WEIGHT_MODULES) and _derived_weight(mod):
            derived.append(mod_name or type(mod).__name__)
    if derived:
        warnings.warn(
            f"{len(derived)} layer(s) compute their weight from other tensors (weight_norm or another "
            f"parametrization) and are left as they are: {', '.join(repr(n) for n in derived[:5])}"
            f"{' ...' if len(derived) > 5 else ''}; quantizing those tensors would not make the weight share values. "
            "To compress them, remove it first: torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') "
            "(torch.nn.utils.remove_weight_norm(layer) for the old weight_norm)",
            stacklevel=3,
        )
    return picked


def _derived_weight(mod: nn.Module) -> bool:
    """Whether the layer's ``weight`` is computed (a parametrization, or the old ``weight_norm``'s
    ``weight_g``/``weight_v``) rather than a tensor of its own."""
    if parametrize.is_parametrized(mod, "weight"):
        return True
    own = dict(mod.named_parameters(recurse=False))
    return "weight" not in own and "weight_v" in own


Compress = Iterable[str] | Callable[[str, torch.Tensor], bool] | None


def selector(obj: nn.Module | Mapping[str, torch.Tensor], compress: Compress,
             names: Iterable[str]) -> Callable[[str, torch.Tensor], bool]:
    """``compress`` as a ``(name, tensor) -> bool`` predicate over the state_dict ``names``:
    a predicate as given, a collection of names (each must exist), or, for None, the weights
    of a module by type (:func:`module_weights`) or of a bare state_dict by name and shape."""
    if callable(compress):
        return compress
    if compress is not None:
        if isinstance(compress, (str, bytes)) or not isinstance(compress, Iterable):
            raise SwsEncodeError(
                f"compress must be tensor names or a (name, tensor) -> bool predicate, got {type(compress).__name__}"
            )
        chosen = set(compress)
        unknown = chosen - set(names)
        if unknown:
            raise SwsEncodeError(f"compress names tensors not in the state_dict: {sorted(unknown)}")
        return lambda n, t: n in chosen
    if isinstance(obj, nn.Module):
        picked = module_weights(obj)
        return lambda n, t: n in picked
    return default_selector
