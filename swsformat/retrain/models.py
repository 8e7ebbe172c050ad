"""Which of a model's weights the mixture prior covers; the paper's MNIST architectures
themselves live in :mod:`swsformat.architectures`, where read paths find them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ..architectures import ARCHITECTURES as MODELS
from ..architectures import LeNet5Caffe, LeNet300100, TutorialNet, build_model

__all__ = [
    "MODELS",
    "LeNet300100",
    "LeNet5Caffe",
    "TutorialNet",
    "build_model",
    "compressible_parameters",
    "default_filter",
    "tied_names",
]


# Module types whose ``weight`` is a weight matrix or kernel the prior covers. transformers'
# GPT-2 ``Conv1D`` is matched by name, so that transformers need not be installed.
WEIGHT_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                  nn.ConvTranspose3d, nn.Embedding, nn.EmbeddingBag, nn.Bilinear)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")

FilterFn = Callable[[str, nn.Module, nn.Parameter], bool]


def default_filter(name: str, module: nn.Module, param: nn.Parameter) -> bool:
    """Linear, conv, transposed conv, embedding and bilinear weights, RNN/LSTM/GRU gate
    matrices (layers and cells), attention input projections (its output projection is a Linear) and GPT-2's
    ``Conv1D``; never biases, norms or 1-D parameters."""
    if param.dim() < 2 or not param.is_floating_point():
        return False
    if isinstance(module, WEIGHT_MODULES) or type(module).__name__ == "Conv1D":
        return name == "weight"
    if isinstance(module, (nn.RNNBase, nn.RNNCellBase)):
        return name.startswith("weight_")
    if isinstance(module, nn.MultiheadAttention):
        return name in ATTENTION_WEIGHTS
    return False


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
