"""Bit-exact round trips of the encoder and decoder, dense and sparse."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import swsformat
from swsformat.container import read_prelude
from swsformat.retrain.models import MODELS, build_model, compressible_parameters

from .conftest import quantized, quantized_model


def roundtrip(sd: dict[str, torch.Tensor], **kw) -> dict[str, torch.Tensor]:
    data = swsformat.encode_bytes(sd, **kw)
    out = swsformat.load(data)
    assert list(out) == list(sd)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape, k
        assert torch.equal(out[k].view(-1).view(torch.uint8), v.contiguous().view(-1).view(torch.uint8)), k
    sparse = swsformat.load(data, sparse=True)
    for k, v in sd.items():
        got = sparse[k]
        if got.layout == torch.sparse_csr:
            dense = got.to_dense().reshape(v.shape)
            assert torch.equal(dense, v), k
            # -0.0 is stored as a value of its own, so count non-zero bit patterns.
            bits = v.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[v.element_size()])
            assert got._nnz() == int((bits != 0).sum())
    return out


@pytest.mark.parametrize(
    "shape",
    [(7,), (1, 1), (3, 5), (300, 784), (20, 1, 5, 5), (4, 3, 2, 2), (0, 5), (5, 0), (2, 3, 0, 4), ()],
)
@pytest.mark.parametrize("density", [0.0, 0.01, 0.3, 1.0])
def test_shapes_and_densities(shape, density):
    t = quantized(shape, density, 16)
    roundtrip({"layer.weight": t}, compress=["layer.weight"])


@pytest.mark.parametrize("k", [2, 3, 16, 100, 256])
def test_codebook_sizes(k):
    t = quantized((64, 300), 0.5, k)
    roundtrip({"w.weight": t})


@pytest.mark.parametrize("bits", [1, 2, 5, 8, 12])
def test_gaps_longer_than_width(bits):
    t = torch.zeros(3, 5000)
    t[0, 4999] = 0.5
    t[1, 0] = -0.25
    t[1, 4000] = 0.5
    t[2, [17, 18, 2000]] = 0.125
    roundtrip({"w.weight": t}, index_bits=bits)


def test_single_nonzero_and_empty_rows():
    t = torch.zeros(10, 10)
    t[9, 9] = 1.5
    roundtrip({"w.weight": t})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dtypes_keep_every_bit(dtype):
    t = quantized((32, 48), 0.2, 9, dtype=dtype)
    t[0, 0] = -0.0  # a negative zero is a value of its own and must survive
    sd = {"w.weight": t, "b": torch.randn(5).to(dtype), "n": torch.arange(4), "m": torch.tensor([True, False])}
    out = roundtrip(sd)
    assert torch.signbit(out["w.weight"][0, 0])


@given(
    rows=st.integers(0, 40),
    cols=st.integers(0, 300),
    density=st.floats(0, 1),
    k=st.integers(2, 256),
    bits=st.one_of(st.none(), st.integers(1, 12), st.just("auto")),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_roundtrip(rows, cols, density, k, bits, seed):
    t = quantized((rows, cols), density, k, seed=seed)
    roundtrip({"w.weight": t}, index_bits=bits)


@pytest.mark.slow
def test_same_bytes_in_another_process_and_hash_seed(tmp_path):
    """Files are byte-reproducible: no set or hash order, time or address leaks into them."""
    import subprocess
    import sys

    sd = {"a.weight": quantized((50, 60), 0.1, 8), "a.bias": torch.randn(50), "b.weight": quantized((7, 9), 0.5, 3)}
    torch.save(sd, tmp_path / "sd.pt")
    here = swsformat.encode_bytes(sd, metadata={"k": "v", "a": "b"})
    script = (
        "import sys, torch, swsformat; sd = torch.load(sys.argv[1]); "
        "sys.stdout.buffer.write(swsformat.encode_bytes(sd, metadata={'k': 'v', 'a': 'b'}))"
    )
    for seed in ("1", "12345"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        there = subprocess.run([sys.executable, "-c", script, str(tmp_path / "sd.pt")], env=env, capture_output=True,
                               check=True).stdout
        assert there == here


@pytest.mark.parametrize("name", sorted(MODELS))
def test_paper_models_after_quantization(name):
    model = quantized_model(name, density=0.05, k=16, seed=1)
    roundtrip(model.state_dict())
    for ib in (None, "auto"):
        roundtrip(model.state_dict(), index_bits=ib)


def test_unquantized_input_says_how_many_values():
    with pytest.raises(swsformat.SwsEncodeError, match=r"has \d+ distinct non-zero values.*Quantize"):
        swsformat.encode_bytes({"fc.weight": torch.randn(30, 30)})


def test_nan_rejected():
    t = torch.zeros(4, 4)
    t[1, 1] = float("nan")
    with pytest.raises(swsformat.SwsEncodeError, match="NaN"):
        swsformat.encode_bytes({"fc.weight": t})


def test_encode_writes_file_and_load_model(tmp_path):
    model = build_model("lenet300-100")
    with torch.no_grad():
        for _, p in compressible_parameters(model):
            p.copy_(torch.where(p.abs() > 0.08, torch.sign(p) * 0.1, torch.zeros(())))
    path = tmp_path / "m.sws"
    size = swsformat.encode(model, path)
    assert path.stat().st_size == size
    assert list(tmp_path.iterdir()) == [path]
    loaded = swsformat.load_model(path)
    assert type(loaded) is type(model) and not loaded.training
    x = torch.randn(3, 1, 28, 28)
    model.eval()
    assert torch.equal(loaded(x), model(x))
    other = swsformat.load_model(path, build_model("lenet300-100"))
    assert torch.equal(other(x), model(x))


def test_inspect_reads_only_the_header(tmp_path):
    sd = {"a.weight": quantized((50, 60), 0.1, 8), "a.bias": torch.randn(50)}
    path = tmp_path / "m.sws"
    swsformat.encode(sd, path, metadata={"author": "me"})
    info = swsformat.inspect(path)
    assert [i["name"] for i in info] == ["a.weight", "a.bias"]
    assert info[0]["nonzeros"] == int(torch.count_nonzero(sd["a.weight"]))
    assert swsformat.read_header(path)["metadata"] == {"author": "me"}
    # Header-only readers still check the file's size against the header: a cut file is refused.
    raw = path.read_bytes()
    prelude = read_prelude(raw)
    (tmp_path / "head.sws").write_bytes(raw[: prelude.length + prelude.stored + 4])
    with pytest.raises(swsformat.SwsFormatError, match="truncated"):
        swsformat.inspect(tmp_path / "head.sws")


def test_sparse_csr_layout():
    t = quantized((20, 1, 5, 5), 0.2, 8)
    out = swsformat.load(swsformat.encode_bytes({"c.weight": t}), sparse=True)["c.weight"]
    assert out.layout == torch.sparse_csr and out.shape == (20, 25)
    assert np.array_equal(out.to_dense().numpy(), t.reshape(20, 25).numpy())


def test_both_format_versions_round_trip_and_unknown_ones_are_refused():
    sd = {"a.weight": quantized((30, 40), 0.1, 6), "a.bias": torch.randn(30), "b.weight": quantized((8, 3, 3, 3), 0.3, 4)}
    sizes = {}
    for version in (1, 2, 3):
        data = swsformat.encode_bytes(sd, version=version)
        assert read_prelude(data).version == version
        out = swsformat.load(data)
        for k in sd:
            assert torch.equal(out[k].view(torch.uint8), sd[k].view(torch.uint8)), (version, k)
        sizes[version] = len(data)
    assert sizes[3] < sizes[2] < sizes[1]
    assert len(swsformat.encode_bytes(sd)) == sizes[3]  # the default
    with pytest.raises(swsformat.SwsEncodeError, match="version 4"):
        swsformat.encode_bytes(sd, version=4)
    with pytest.raises(swsformat.SwsEncodeError, match="no context coder"):
        swsformat.encode_bytes(sd, version=2, coder="context")


@pytest.mark.parametrize("compress", [True, 3, "w.weight"])
def test_compress_of_the_wrong_type_is_an_encode_error(compress):
    with pytest.raises(swsformat.SwsEncodeError, match="compress must be tensor names"):
        swsformat.encode_bytes({"w.weight": torch.zeros(2, 2)}, compress=compress)


def test_many_negative_zeros_are_named_with_the_fix():
    """Masking by multiplication leaves -0.0 for every pruned negative weight; the file keeps
    them as entries (every bit survives), and the encoder says how to drop them."""
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-4, 5, (64, 64), generator=g).float() * 0.25
    pruned = w * (torch.rand(64, 64, generator=g) < 0.1)
    with pytest.warns(UserWarning, match=r"'w.weight'.*negative zeros.*w\.add_\(0\.0\)"):
        kept = swsformat.encode_bytes({"w.weight": pruned})
    assert torch.equal(torch.signbit(swsformat.load_state_dict(kept)["w.weight"]), torch.signbit(pruned))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dropped = swsformat.encode_bytes({"w.weight": pruned + 0.0})
    assert len(dropped) < len(kept)
