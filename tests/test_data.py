"""The MNIST loader without a network: IDX parsing, lookup, checksums, a monkeypatched download."""

from __future__ import annotations

import gzip
import io
import struct

import numpy as np
import pytest
import torch

from swsformat import SwsDataError
from swsformat.retrain import data


def idx(array: np.ndarray) -> bytes:
    return struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_set(folder, n_train=6, n_test=4, seed=0):
    """Four small gzipped IDX files; returns the arrays."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, n_train, dtype=np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, fname in data.FILES.items():
        (folder / fname).write_bytes(gzip.compress(idx(arrays[key])))
    return arrays


@pytest.fixture
def isolated(monkeypatch, tmp_path):
    """No $SWSFORMAT_DATA, an empty cache and no system folders: only what a test puts there."""
    monkeypatch.delenv(data.ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SYSTEM_DIRS", {})
    monkeypatch.setattr(data, "CHECKSUMS", {})
    return tmp_path


def test_parse_idx_checks_every_declared_size():
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert np.array_equal(data.parse_idx(idx(a), 3), a)
    with pytest.raises(ValueError, match="3 dimensions"):
        data.parse_idx(idx(a[0]), 3)
    with pytest.raises(ValueError, match="header declares"):
        data.parse_idx(idx(a)[:-1], 3)
    with pytest.raises(ValueError, match="magic"):
        data.parse_idx(b"\0\0", 1)


@pytest.mark.parametrize("normalization", ["unit", "standard"])
def test_load_from_a_folder(isolated, normalization):
    arrays = write_set(isolated / "mnist")
    train, test = data.load("mnist", root=isolated, download=False, normalization=normalization)
    assert train.x.shape == (6, 1, 28, 28) and test.x.shape == (4, 1, 28, 28) and train.x.dtype == torch.float32
    assert torch.equal(train.y, torch.from_numpy(arrays["train_labels"].astype(np.int64)))
    spec = data.input_spec("mnist", normalization)
    want = (arrays["test_images"].astype(np.float32) * np.float32(spec["scale"]) - spec["mean"]) / spec["std"]
    assert torch.allclose(test.x[:, 0], torch.from_numpy(want), atol=1e-6)


def test_missing_files_name_every_folder_searched(isolated):
    write_set(isolated / "partial")
    (isolated / "partial" / data.FILES["test_labels"]).unlink()
    with pytest.raises(SwsDataError, match="IDX files not found in") as err:
        data.load("mnist", root=isolated / "partial", download=False)
    assert str(isolated / "partial") in str(err.value) and str(isolated / "cache") in str(err.value)


def test_bad_checksum_is_refused(isolated, monkeypatch):
    write_set(isolated / "mnist")
    monkeypatch.setattr(data, "CHECKSUMS", {"mnist": {"train_labels": "0" * 32}})
    with pytest.raises(SwsDataError, match="MD5 mismatch for mnist train_labels"):
        data.load("mnist", root=isolated, download=False)


def test_corrupt_gzip_names_the_file(isolated):
    write_set(isolated / "mnist")
    bad = isolated / "mnist" / data.FILES["test_images"]
    bad.write_bytes(bad.read_bytes()[:50])
    with pytest.raises(SwsDataError, match="t10k-images-idx3-ubyte.gz: not a gzip-compressed IDX file"):
        data.load("mnist", root=isolated, download=False)


def test_mismatched_counts(isolated):
    write_set(isolated / "mnist")
    (isolated / "mnist" / data.FILES["train_labels"]).write_bytes(gzip.compress(idx(np.zeros(5, np.uint8))))
    with pytest.raises(SwsDataError, match="6 images but 5 labels"):
        data.load("mnist", root=isolated, download=False)


def test_download_fills_the_cache_and_checks_it(isolated, monkeypatch):
    source = isolated / "mirror"
    arrays = write_set(source)
    fetched = []

    def urlopen(url, timeout):
        fetched.append(url)
        if url.startswith("https://bad/"):
            raise OSError("unreachable")
        return io.BytesIO((source / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(data, "MIRRORS", {"mnist": ["https://bad/", "https://good/"]})
    monkeypatch.setattr(data, "CHECKSUMS", {"mnist": {"test_labels": __import__("hashlib").md5(
        idx(arrays["test_labels"])).hexdigest()}})
    train, _ = data.load("mnist")
    assert len(fetched) == 8 and all(u.startswith("https://") for u in fetched)
    assert data.locate("mnist") == isolated / "cache" / "swsformat" / "mnist"
    assert len(train) == 6
    fetched.clear()
    data.load("mnist")  # from the cache now
    assert fetched == []


def test_download_failure_says_where_to_put_the_files(isolated, monkeypatch):
    def urlopen(url, timeout):
        raise OSError("no network")

    monkeypatch.setattr(data.urllib.request, "urlopen", urlopen)
    with pytest.raises(SwsDataError, match="could not download .* Put the four IDX .gz files"):
        data.load("mnist")
    assert not any((isolated / "cache" / "swsformat" / "mnist").glob("*.gz"))


def test_unknown_names_are_refused():
    with pytest.raises(ValueError, match="unknown data set"):
        data.load("cifar")
    with pytest.raises(ValueError, match="normalization must be"):
        data.load("mnist", normalization="zscore")
