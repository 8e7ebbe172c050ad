"""MNIST and Fashion-MNIST from the standard IDX ``.gz`` files, held in memory as tensors.

No torchvision: the IDX format is four lines of parsing. Files are looked up in an
explicit folder, then ``$SWSFORMAT_DATA``, then the user cache, then downloaded from
public mirrors and verified by MD5 before use.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SwsDataError

ENV_VAR = "SWSFORMAT_DATA"

FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# MD5 of the *uncompressed* IDX files, as published with each data set.
CHECKSUMS = {
    "mnist": {
        "train_images": "6bbc9ace898e44ae57da46a324031adb",
        "train_labels": "a25bea736e30d166cdddb491f175f624",
        "test_images": "2646ac647ad5339dbf082846283269ea",
        "test_labels": "27ae3e4e09519cfbb04c329615203637",
    },
}

MIRRORS = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion-mnist": [
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ],
}

SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}

# Per-pixel statistics of the training sets, for normalization="standard".
STATISTICS = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}
NORMALIZATIONS = ("unit", "standard")


@dataclass
class Split:
    """One split held in memory: ``x`` float32 (N, 1, 28, 28) standardised, ``y`` int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, n: int) -> Split:
        """The first ``n`` samples: small budgets for tests and smoke runs."""
        return Split(self.x[:n], self.y[:n])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


def parse_idx(raw: bytes, expected_dims: int) -> np.ndarray:
    """Parse an uncompressed IDX file of unsigned bytes, checking every declared size."""
    if len(raw) < 4:
        raise ValueError("IDX file shorter than its 4-byte magic")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code != 0x08 or ndim != expected_dims:
        raise ValueError(f"not an IDX uint8 file with {expected_dims} dimensions")
    header = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + count:
        raise ValueError(f"IDX file holds {len(raw) - header} bytes, its header declares {count}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _candidate_dirs(name: str, root: str | os.PathLike | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        dirs += [Path(root), Path(root) / name]
    env = os.environ.get(ENV_VAR)
    if env:
        dirs += [Path(env) / name, Path(env)]
    dirs.append(cache_dir() / name)
    dirs += SYSTEM_DIRS.get(name, [])
    return dirs


def cache_dir() -> Path:
    """The per-user download cache (``$XDG_CACHE_HOME/swsformat`` or ``~/.cache/swsformat``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "swsformat"


def locate(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The first folder holding all four IDX files of ``name`` (see :func:`load`), or None."""
    for d in _candidate_dirs(name, root):
        if all((d / f).is_file() for f in FILES.values()):
            return d
    return None


def _verify(name: str, key: str, raw: bytes, source: str) -> None:
    want = CHECKSUMS.get(name, {}).get(key)
    if want is not None and hashlib.md5(raw).hexdigest() != want:
        raise SwsDataError(f"{source}: MD5 mismatch for {name} {key}; delete it and download again")


def _download(name: str) -> Path:
    target = cache_dir() / name
    target.mkdir(parents=True, exist_ok=True)
    errors = []
    for key, fname in FILES.items():
        dest = target / fname
        if dest.is_file():
            continue
        for mirror in MIRRORS[name]:
            try:
                with urllib.request.urlopen(mirror + fname, timeout=30) as resp:
                    blob = resp.read()
                _verify(name, key, gzip.decompress(blob), mirror + fname)
            except Exception as exc:  # noqa: BLE001 - try the next mirror, report all at the end
                errors.append(f"{mirror}{fname}: {exc}")
                continue
            with tempfile.NamedTemporaryFile(dir=target, delete=False) as tmp:
                tmp.write(blob)
            os.replace(tmp.name, dest)
            break
        else:
            raise SwsDataError(
                f"{name}: could not download {fname} ({'; '.join(errors)}). Put the four IDX .gz "
                f"files {sorted(FILES.values())} in a folder and pass it (--data-root, or root= in Python) or set ${ENV_VAR}."
            )
    return target


def load(
    name: str = "mnist", root: str | os.PathLike | None = None, download: bool = True, normalization: str = "unit"
) -> tuple[Split, Split]:
    """Load ``(train, test)`` of ``"mnist"`` or ``"fashion-mnist"`` as in-memory tensors.

    ``normalization="unit"`` scales pixels to [0, 1], so blank pixels are exactly 0 and the
    weights reading them cost nothing when pruned (the original tutorial's choice);
    ``"standard"`` subtracts the training mean and divides by the standard deviation.

    Example:
        >>> train, test = load("mnist")  # doctest: +SKIP
        >>> train.x.shape
        torch.Size([60000, 1, 28, 28])
    """
    if name not in MIRRORS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(MIRRORS)}")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    folder = locate(name, root)
    if folder is None:
        if not download:
            searched = ", ".join(str(d) for d in _candidate_dirs(name, root))
            raise SwsDataError(
                f"{name} IDX files not found in: {searched}. Put {sorted(FILES.values())} in one "
                f"of them, or set ${ENV_VAR} to the folder."
            )
        folder = _download(name)
    arrays = {}
    for key, fname in FILES.items():
        path = folder / fname
        try:
            raw = gzip.decompress(path.read_bytes())
            arrays[key] = parse_idx(raw, 3 if key.endswith("images") else 1)
        except (OSError, EOFError, zlib.error, ValueError) as exc:
            raise SwsDataError(f"{path}: not a gzip-compressed IDX file ({exc}); delete it and download again") from None
        _verify(name, key, raw, str(path))
    mean, std = STATISTICS[name] if normalization == "standard" else (0.0, 1.0)

    def split(prefix: str) -> Split:
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if images.shape[0] != labels.shape[0]:
            raise SwsDataError(f"{name} {prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
        x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
        return Split((x - mean) / std, torch.from_numpy(labels.astype(np.int64)))

    return split("train"), split("test")


def input_spec(name: str, normalization: str) -> dict[str, object]:
    """What a model trained on ``name`` expects, stored in its file as metadata ``sws.input``:
    images of ``shape`` with pixels scaled to [0, 1], then ``(x - mean) / std``."""
    if name not in MIRRORS or normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown data set {name!r} or normalization {normalization!r}")
    mean, std = STATISTICS[name] if normalization == "standard" else (0.0, 1.0)
    return {"data": name, "normalization": normalization, "shape": [1, 28, 28], "scale": 1 / 255, "mean": mean,
            "std": std}
