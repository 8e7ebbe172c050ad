"""Built-in architectures a ``.sws`` file can name, in a registry users can extend.

A file records ``{"name", "kwargs"}``; :func:`swsformat.load_model` builds that module from
the registry (read paths need nothing from the training code). Register your own::

    @swsformat.register_architecture("my-net")
    class MyNet(nn.Module): ...
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def register_architecture(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Class (or factory) decorator: files naming ``name`` load into it by ``load_model(path)``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not factory:
            raise ValueError(f"architecture {name!r} is already registered ({ARCHITECTURES[name]!r})")
        ARCHITECTURES[name] = factory
        return factory

    return add


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate a registered architecture by name (``kwargs`` go to its constructor)."""
    try:
        factory = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; choose one of {sorted(ARCHITECTURES)}") from None
    return factory(**kwargs)


@register_architecture("lenet300-100")
class LeNet300100(nn.Module):
    """LeNet-300-100: 784-300-100-10 fully connected, 266K weights."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.sws_architecture = {"name": "lenet300-100", "kwargs": {"num_classes": num_classes}}
        self.fc1 = nn.Linear(784, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@register_architecture("lenet5-caffe")
class LeNet5Caffe(nn.Module):
    """LeNet-5 as in Caffe: conv 20@5x5, pool, conv 50@5x5, pool, 800-500-10; 431K weights."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.sws_architecture = {"name": "lenet5-caffe", "kwargs": {"num_classes": num_classes}}
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


@register_architecture("tutorial-net")
class TutorialNet(nn.Module):
    """The seeds' tutorial net: conv 25@5x5/2, conv 50@3x3/2, 1250-500-10; 642K weights."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.sws_architecture = {"name": "tutorial-net", "kwargs": {"num_classes": num_classes}}
        self.conv1 = nn.Conv2d(1, 25, 5, stride=2)
        self.conv2 = nn.Conv2d(25, 50, 3, stride=2)
        self.fc1 = nn.Linear(1250, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        return self.fc2(F.relu(self.fc1(x.flatten(1))))
