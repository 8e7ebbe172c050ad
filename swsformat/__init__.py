"""swsformat: soft weight-sharing compression of PyTorch models into ``.sws`` files.

Public API, flat in the spirit of ``safetensors.torch``::

    swsformat.encode(model_or_state_dict, "model.sws")
    sd = swsformat.load_state_dict("model.sws", device="cuda", sparse=False)
    with swsformat.open("model.sws") as f:               # lazy: header now, tensors on request
        w = f.get_tensor("fc1.weight")
    model = swsformat.load_model("model.sws")            # built-in architectures
    model = swsformat.load_model("model.sws", MyNet())  # your own module
    swsformat.size_report("model.sws")
    swsformat.prune_and_cluster(model, prune=0.9, clusters=16, inplace=True)  # post-training
    swsformat.remove_dead_units_(model, example_batch)  # zero what cannot change the output
"""

from __future__ import annotations

__version__ = "0.3.0"

from .architectures import register_architecture  # noqa: E402
from .encoder import encode, encode_bytes  # noqa: E402
from .errors import (  # noqa: E402
    SwsBatchError,
    SwsCheckpointError,
    SwsChecksumError,
    SwsConfigError,
    SwsDataError,
    SwsDecodeError,
    SwsEncodeError,
    SwsError,
    SwsFormatError,
    SwsOutputError,
    SwsTrainingError,
)
from .reader import SwsFile, load, load_model, load_state_dict, open, read_header  # noqa: E402
from .report import inspect, size_report  # noqa: E402


def _start_numba_threads() -> None:
    """Start numba's thread pool now, keeping torch's thread count. numba's OpenMP layer sets
    OpenMP's thread count (which torch reads) to numba's when its pool starts: a torchrun
    worker's ``torch.set_num_threads(1)`` was undone by the first swsformat call, and a
    two-process DDP step of ``scripts/text_gpt.py`` ran 5x slower even where the library did
    nothing (1.48 against 7.56 steps/s). Starting the pool costs about a millisecond."""
    import numba
    import torch

    before = torch.get_num_threads()
    numba.get_num_threads()
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


_start_numba_threads()


def __getattr__(name: str):
    """The methods (``compress``, ``CompressConfig``, ``PriorConfig``, ``RetrainConfig``,
    ``SoftWeightSharing``, ``BayesianCompression``) without importing training at startup;
    ``prune_and_cluster`` and ``remove_dead_units_`` on first use too."""
    if name in ("compress", "CompressConfig", "SoftWeightSharing", "PriorConfig", "RetrainConfig"):
        from . import retrain

        return getattr(retrain, name)
    if name == "BayesianCompression":
        from .retrain.bayesian import BayesianCompression

        return BayesianCompression
    if name == "prune_and_cluster":
        from .quantize import prune_and_cluster

        return prune_and_cluster
    if name == "remove_dead_units_":
        from .exact import remove_dead_units_

        return remove_dead_units_
    raise AttributeError(f"module 'swsformat' has no attribute {name!r}")


__all__ = [
    "BayesianCompression",
    "CompressConfig",
    "PriorConfig",
    "RetrainConfig",
    "SoftWeightSharing",
    "SwsBatchError",
    "SwsCheckpointError",
    "SwsChecksumError",
    "SwsConfigError",
    "SwsDecodeError",
    "SwsEncodeError",
    "SwsError",
    "SwsFile",
    "SwsFormatError",
    "SwsOutputError",
    "SwsDataError",
    "SwsTrainingError",
    "__version__",
    "compress",
    "encode",
    "encode_bytes",
    "inspect",
    "load",
    "load_model",
    "load_state_dict",
    "open",
    "prune_and_cluster",
    "read_header",
    "register_architecture",
    "remove_dead_units_",
    "size_report",
]
