"""The training loop's helpers (swsformat.retrain.train)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, SubsetRandomSampler, TensorDataset

from swsformat import SwsBatchError
from swsformat.retrain import RetrainConfig
from swsformat.retrain.data import Split
from swsformat.retrain.train import dataset_size


def _data(n: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 3), torch.randint(0, 2, (n,))


def test_dataset_size_counts_samples_not_batches():
    x, y = _data()
    assert dataset_size(Split(x, y)) == 100
    assert dataset_size(DataLoader(TensorDataset(x, y), batch_size=32)) == 100
    assert dataset_size(DataLoader(TensorDataset(x, y), batch_size=32, sampler=SubsetRandomSampler(range(40)))) == 40
    sampler = DistributedSampler(TensorDataset(x, y), num_replicas=2, rank=0)
    assert dataset_size(DataLoader(TensorDataset(x, y), batch_size=8, sampler=sampler)) == 100
    # A list of batches: len() says 4 (batches); the prior's N is the 100 samples.
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 100, 32)]
    assert len(batches) == 4 and dataset_size(batches) == 100

    class Loader:  # a user's re-iterable without __len__, inputs as a dict
        def __iter__(self):
            return iter([({"ids": x[:60]}, y[:60]), ({"ids": x[60:]}, y[60:])])

    assert dataset_size(Loader()) == 100


def test_dataset_size_refuses_what_it_cannot_count():
    x, y = _data()
    with pytest.raises(SwsBatchError, match="iterator") as info:
        dataset_size(iter([(x, y)]))
    assert isinstance(info.value, TypeError)
    with pytest.raises(ValueError, match="no batches"):
        dataset_size([])
    with pytest.raises(SwsBatchError, match="train_size"):
        dataset_size([("text", y)])
    with pytest.raises(ValueError, match="train_size"):
        RetrainConfig(train_size=0)
