"""Which of a model's weights the mixture prior covers; the paper's MNIST architectures
themselves live in :mod:`swsformat.architectures`, where read paths find them."""

from __future__ import annotations

from torch import nn

from ..architectures import ARCHITECTURES as MODELS
from ..architectures import LeNet5Caffe, LeNet300100, TutorialNet, build_model

__all__ = ["MODELS", "LeNet300100", "LeNet5Caffe", "TutorialNet", "build_model", "compressible_parameters"]


def compressible_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Weights of conv and linear layers: the tensors the mixture prior covers."""
    return [
        (f"{mod_name}.weight" if mod_name else "weight", mod.weight)
        for mod_name, mod in model.named_modules()
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    ]
