"""Format 3: the binary index, the context-modelled coder, aliases for tied tensors, per-tensor reads."""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import swsformat
from swsformat import ctxcoder, format3
from swsformat.container import (
    HEADER_MSGPACK,
    AliasTensor,
    Container,
    ContextTensor,
    _serialize3,
    decode_header,
    pack_head,
    parse,
    read_prelude,
)
from swsformat.errors import SwsDecodeError, SwsError, SwsFormatError

from .conftest import quantized
from .test_bad_files import rejects_within


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@given(
    rows=st.integers(0, 12),
    cols=st.integers(0, 40),
    taps=st.sampled_from([None, (3, 3), (5,)]),
    density=st.floats(0.0, 1.0),
    k=st.integers(2, 256),
    seed=st.integers(0, 2**16),
    dead=st.booleans(),
)
def test_context_coder_round_trips_any_matrix(rows, cols, taps, density, k, seed, dead):
    shape = (rows, cols) if taps is None else (rows, max(cols // 9, 1), *taps)
    w = quantized(shape, density, k, seed=seed)
    if dead and rows > 2:  # dead units and dead inputs, as pruning leaves them
        w[1] = 0
        w[:, :1] = 0
    data = swsformat.encode_bytes({"w.weight": w}, coder="context", smallest=False)
    f = swsformat.open(data)
    assert f.entry("w.weight").coder == "context"
    assert same_bits(f.get_tensor("w.weight"), w)
    if w.dim() >= 2:
        csr = f.get_tensor("w.weight", sparse=True)
        assert torch.equal(csr.to_dense(), w.reshape(w.shape[0], math.prod(w.shape[1:])))


def test_auto_coder_is_never_larger_than_either_coder_alone():
    sd = {
        "conv.weight": quantized((16, 8, 3, 3), 0.2, 9, seed=1),
        "fc.weight": quantized((64, 128), 0.03, 15, seed=2),
        "dense.weight": quantized((8, 8), 1.0, 4, seed=3),
    }
    sizes = {c: len(swsformat.encode_bytes(sd, coder=c)) for c in ("auto", "huffman", "context")}
    assert sizes["auto"] <= min(sizes["huffman"], sizes["context"])
    assert sizes["auto"] < len(swsformat.encode_bytes(sd, version=2))


def test_dead_units_and_inputs_cost_almost_nothing_with_the_context_coder():
    """Dead rows and columns (pruned units and inputs) are two masks of a few bytes."""
    w = quantized((200, 300), 0.2, 15, seed=4)
    w[::3] = 0  # a third of the units dead
    w[:, 100:200] = 0  # and a block of inputs
    live = w[w.abs().sum(1) > 0][:, w.abs().sum(0) > 0]
    ctx = len(swsformat.encode_bytes({"fc.weight": w}, coder="context"))
    assert ctx < len(swsformat.encode_bytes({"fc.weight": live}, coder="context")) + 40
    assert ctx < len(swsformat.encode_bytes({"fc.weight": w}, coder="huffman"))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.emb.weight  # tied, as GPT-2's wte and lm_head


def quantized_tied() -> Tied:
    m = Tied()
    with torch.no_grad():
        m.emb.weight.copy_(quantized((50, 16), 0.3, 9, seed=5))
        m.body.weight.copy_(quantized((16, 16), 0.5, 5, seed=6))
    return m


def test_tied_weights_are_stored_once_and_come_back_as_one_tensor(tmp_path):
    m = quantized_tied()
    path = tmp_path / "tied.sws"
    size = swsformat.encode(m, path)
    untied = {k: v.clone() for k, v in m.state_dict().items()}
    assert size < len(swsformat.encode_bytes(untied)) - 100  # the copy's payload is not stored
    with swsformat.open(path) as f:
        assert f.entry("head.weight").kind == "alias" and f.entry("head.weight").alias_of == "emb.weight"
        assert same_bits(f.get_tensor("head.weight"), m.emb.weight.detach())
        sd = f.state_dict()
    assert sd["head.weight"] is sd["emb.weight"]
    rep = swsformat.size_report(path)
    assert rep["aliases"] == 1
    assert rep["fp32_bytes"] == 4 * sum(p.numel() for p in m.parameters())  # the tie counted once
    loaded = swsformat.load_model(path, Tied())
    assert loaded.head.weight is loaded.emb.weight
    assert same_bits(loaded.head.weight.detach(), m.emb.weight.detach())
    # Version 2 has no aliases: the tensor is stored under each name.
    sd2 = swsformat.load(swsformat.encode_bytes(m, version=2))
    assert sd2["head.weight"] is not sd2["emb.weight"] and torch.equal(sd2["head.weight"], sd2["emb.weight"])


def test_views_and_equal_copies_are_not_aliases():
    base = quantized((8, 8), 0.5, 5, seed=7)
    sd = {"a.weight": base, "b.weight": base.clone(), "c.weight": base[:4], "d.weight": base.t()}
    f = swsformat.open(swsformat.encode_bytes(sd))
    assert [f.entry(k).kind for k in sd] == ["sws", "sws", "sws", "sws"]
    for k, v in sd.items():
        assert same_bits(f.get_tensor(k), v.contiguous())


def test_one_tensor_is_read_without_the_others(tmp_path):
    """Damage in one tensor's bytes is found and named; the other tensors still load."""
    sd = {"a.weight": quantized((30, 40), 0.2, 9, seed=8), "b.weight": quantized((20, 20), 0.3, 5, seed=9)}
    data = bytearray(swsformat.encode_bytes(sd))
    f = swsformat.open(bytes(data))
    e = f.entry("a.weight")
    data[f.header.data_start + e.end - 1] ^= 0x10
    path = tmp_path / "damaged.sws"
    path.write_bytes(bytes(data))
    with swsformat.open(path) as g:
        assert same_bits(g.get_tensor("b.weight"), sd["b.weight"])
        with pytest.raises(swsformat.SwsChecksumError, match="'a.weight'"):
            g.get_tensor("a.weight")


def test_index_is_compact():
    """Names share their prefixes and codebooks are stored once (one mixture for every layer)."""
    values = torch.tensor([-0.5, -0.25, 0.25, 0.5])
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(6):
        w = values[torch.randint(0, 4, (10, 10), generator=g)]
        sd[f"encoder.layers.{i}.attention.weight"] = torch.where(torch.rand(10, 10, generator=g) < 0.3, w, 0.0)
    f = swsformat.open(swsformat.encode_bytes(sd, coder="context"))
    records = [e.index_bytes for e in f.header.entries]
    assert records[0] > 40 + 4 * 4  # the first holds the full name and the codebook
    assert max(records[1:]) < 20  # the rest: one differing byte of name, a codebook reference, counts, CRC


def v3_index(data: bytes) -> tuple[bytes, bytes]:
    p = read_prelude(data)
    return decode_header(data, p), data[p.data_start :]


def with_index(index: bytes, payload: bytes) -> bytes:
    return pack_head(index, 3, HEADER_MSGPACK) + payload


def test_hostile_indexes_are_refused_with_the_field_named():
    data = swsformat.encode_bytes({"a.weight": quantized((4, 6), 0.5, 3)}, coder="context", metadata={})
    index, payload = v3_index(data)
    assert parse(with_index(index, payload)).tensors[0].name == "a.weight"
    with pytest.raises(SwsFormatError, match="bytes after the last tensor record"):
        swsformat.load(with_index(index + b"\x00", payload))
    # a varint with a redundant continuation byte is not canonical
    lib = len("swsformat 0.3.0")
    bad = index[:0] + bytes([lib | 0x80, 0x00]) + index[1:]
    with pytest.raises(SwsFormatError, match="not canonical"):
        swsformat.load(with_index(bad, payload))
    with pytest.raises(SwsFormatError, match="varint longer"):
        swsformat.load(with_index(b"\xff" * 11 + index[1:], payload))
    # the tensor count says one more than there is
    at = index.index(b"a.weight") - 4  # count, shared prefix, shared suffix, length, name
    with pytest.raises(SwsFormatError, match="index ends"):
        swsformat.load(with_index(index[:at] + b"\x02" + index[at + 1 :], payload))


def test_hostile_aliases_and_payloads_are_refused():
    w = quantized((6, 10), 0.4, 5, seed=11)
    c = parse(swsformat.encode_bytes({"a.weight": w, "b.weight": w}, coder="context"))
    assert isinstance(c.tensors[1], AliasTensor)
    forward = parse(swsformat.encode_bytes({"a.weight": w, "b.weight": w}, coder="context"))
    forward.tensors = [forward.tensors[1], forward.tensors[0]]  # the alias before its target
    with pytest.raises(SwsFormatError, match="alias"):
        swsformat.load(_serialize3(forward, check=False))
    with pytest.raises(swsformat.SwsEncodeError, match="alias"):
        _serialize3(forward)
    t = c.tensors[0]
    assert isinstance(t, ContextTensor)
    for data, match in [
        (np.append(t.data, np.uint8(0)), "continue past"),
        (t.data[:-1], "end before"),
        (t.data[:3], "at least 4"),
    ]:
        bad = parse(_serialize3(c))
        bad.tensors[0].data = data
        with pytest.raises(SwsFormatError, match=match):
            swsformat.load(_serialize3(bad, check=False))
    bad = parse(_serialize3(c))
    bad.tensors[0].nonzeros -= 1
    with pytest.raises(SwsDecodeError, match="non-zero"):
        swsformat.load(_serialize3(bad, check=False))


def test_small_file_declaring_a_huge_context_tensor_is_refused_before_allocating():
    c = parse(swsformat.encode_bytes({"a.weight": torch.zeros(2, 2)}, coder="context", smallest=False))
    t = c.tensors[0]
    t.shape = (1 << 15, 1 << 15)
    peak = rejects_within(_serialize3(c, check=False), "over the limit")
    assert peak < 1 << 20
    t.shape = (0, 1 << 40)  # no elements, but a huge column count: nothing is allocated for it
    assert swsformat.load(_serialize3(c, check=False))["a.weight"].shape == (0, 1 << 40)


def test_index_crc_and_layout_are_as_specified():
    """The prelude and index of a one-tensor file, byte by byte against SPEC.md section 8."""
    w = torch.tensor([[0.0, 0.5], [-0.5, 0.0]])
    data = swsformat.encode_bytes({"w": w}, compress=["w"], coder="context", smallest=False, metadata={"k": "v"})
    assert data[:8] == b"\x89SWS\r\n\x1a\n" and data[8:10] == b"\x03\x00" and data[10] == 0 and data[11] == 0
    stored, size = struct.unpack("<II", data[12:20])
    assert stored == size
    index = data[20 : 20 + stored]
    assert struct.unpack("<I", data[20 + stored : 24 + stored])[0] == zlib.crc32(data[: 20 + stored])
    lib = f"swsformat {swsformat.__version__}".encode()
    expect = format3.varint(len(lib)) + lib + b"\x00" + b"\x01" + b"\x01k\x01v" + b"\x01"
    assert index.startswith(expect)
    rec = index[len(expect) :]
    # name: shares 0 bytes at either end, then "w"; kind 4 (context, counting); dtype 1 (float32); 2 dims
    # 2, 2; own codebook of 2 patterns 0.5 (0x3f000000) and -0.5 (0xbf000000); 2 non-zeros.
    head = b"\x00\x00\x01w" + b"\x04" + b"\x01\x02\x02\x02" + b"\x00\x02" + struct.pack("<II", 0x3F000000, 0xBF000000) + b"\x02"
    assert rec.startswith(head)
    length = rec[len(head)]
    payload = data[-length:]
    assert struct.unpack("<I", rec[len(head) + 1 :])[0] == zlib.crc32(payload)
    assert len(data) == (24 + stored + 7) // 8 * 8 + length


def test_load_model_decodes_into_the_modules_own_tensors(tmp_path):
    m = quantized_tied()
    path = tmp_path / "tied.sws"
    swsformat.encode(m, path)
    fresh = Tied()
    with swsformat.open(path) as f:
        sd = f.state_dict_into(fresh)
    assert sd["emb.weight"] is fresh.emb.weight and sd["head.weight"] is fresh.emb.weight
    assert sd["body.bias"] is fresh.body.bias  # a raw tensor, copied into place
    for k, v in m.state_dict().items():
        assert same_bits(sd[k].detach(), v), k
    # Another dtype, or another shape, falls back to decoding then copying.
    wide = Tied().double()
    loaded = swsformat.load_model(path, wide)
    assert loaded.body.weight.dtype == torch.float64 and torch.equal(loaded.body.weight.float(), m.body.weight)
    small = Tied()
    small.body = nn.Linear(16, 8)
    with pytest.raises(SwsFormatError, match="do not fit"):
        swsformat.load_model(path, small)


def test_reviewed_attacks_are_refused_cheaply():
    """Findings of an independent attack on the version 3 reader, each refused before work."""
    base = parse(swsformat.encode_bytes({"w": torch.zeros(2, 2, dtype=torch.float64)}, compress=["w"], coder="context",
                                        smallest=False))
    # numpy's byte strides of an empty (0, 2**60) float64 tensor overflow int64
    base.tensors[0].shape = (0, 1 << 60)
    with pytest.raises(SwsFormatError, match="byte strides"):
        swsformat.load(_serialize3(base, check=False))
    # the context decoder's per-column state counts against the output limit: a 33M-column
    # float16 row is 66 MB of output but needs 10 bytes per column more while decoding
    c = parse(swsformat.encode_bytes({"w": torch.zeros(2, 2, dtype=torch.float16)}, compress=["w"], coder="context",
                                     smallest=False))
    c.tensors[0].shape = (1, 30_000_000)
    peak = rejects_within(_serialize3(c, check=False), "over the limit")
    assert peak < 1 << 20
    # names cost a few bytes each when they share their ends with the previous one; what they
    # expand to is bounded like a version 2 header
    raw = swsformat.encode_bytes({"x": torch.zeros(1)})
    c = parse(raw)
    stem = "a" * 480
    c.tensors += [AliasTensor(f"{stem}{i:05d}{stem}", "x") for i in range(20000)]
    with pytest.raises(SwsFormatError, match="names add up"):
        swsformat.load(_serialize3(c, check=False))


def test_auto_takes_the_slow_context_coder_only_where_it_pays():
    """iid sparsity (a pruned random layer): context saves almost nothing and decodes every
    position, so auto keeps Huffman; structured sparsity (dead units) keeps the context coder."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g)  # context saves 132 bytes of 88,944: not 1 per 4096 weights
    w = torch.where(w.abs() > 1.645, (w * 4).round().clamp(-8, 8) / 4, 0.0)
    f = swsformat.open(swsformat.encode_bytes({"a.weight": w}))
    assert f.entry("a.weight").coder == "huffman"
    w[::2] = 0
    w[:, 200:400] = 0
    f = swsformat.open(swsformat.encode_bytes({"a.weight": w}))
    assert f.entry("a.weight").coder == "context"


@given(
    shape=st.sampled_from([(0,), (1,), (37,), (5, 8), (3, 2, 3, 3), ()]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int8,
                           torch.uint8, torch.bool]),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_sparse_raw_round_trips_any_dtype_bit_exactly(shape, dtype, density, seed):
    """Kind 5 keeps every element's bytes, negative zero included; the rest are zero."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        t = torch.rand(shape, generator=g) < density
    else:
        t = (torch.randn(shape, generator=g) * 100).to(dtype)
        t[torch.rand(shape, generator=g) >= density] = 0
        if dtype.is_floating_point and t.numel():
            t.view(-1)[0] = -0.0
    data = swsformat.encode_bytes({"b": t}, coder="context")
    f = swsformat.open(data)
    assert same_bits(f.get_tensor("b"), t)
    if f.entry("b").coder == "sparse":
        as_bytes = t.contiguous().reshape(-1).view(torch.uint8).reshape(t.numel(), -1)
        assert f.entry("b").kind == "raw" and f.entry("b").nonzeros == int((as_bytes != 0).any(1).sum())


def test_sparse_raw_stores_only_the_live_units_biases():
    """Biases of pruned units are zero: only the live ones' bytes are stored, positions cost bits."""
    b = torch.randn(300, generator=torch.Generator().manual_seed(0)).half()
    b[::3] = 0
    sd = {"fc.bias": b}
    f = swsformat.open(swsformat.encode_bytes(sd))
    assert f.entry("fc.bias").coder == "sparse"
    assert f.entry("fc.bias").stored_bytes < 200 * 2 + 40
    assert f.entry("fc.bias").stored_bytes < swsformat.open(swsformat.encode_bytes(sd, coder="huffman")).entry("fc.bias").stored_bytes - 150
    assert same_bits(swsformat.load_state_dict(swsformat.encode_bytes(sd))["fc.bias"], b)
    # versions 1-2 have no kind 5; "huffman" (fastest decode) never takes it; a dense tensor stays raw
    assert swsformat.open(swsformat.encode_bytes(sd, version=2)).entry("fc.bias").coder != "sparse"
    assert swsformat.open(swsformat.encode_bytes({"fc.bias": b + 1})).entry("fc.bias").coder != "sparse"


def test_both_estimators_decode_and_counting_is_smaller_on_a_trained_layer():
    """Kind 2 files (two-rate estimator) still decode; the writer's kind 4 is smaller; the
    estimator is part of the record (the same bytes under the other one do not decode to w)."""
    from swsformat.encoder import _symbols

    w = quantized((120, 200), 0.1, 15, seed=8)
    w[::4] = 0
    t = parse(swsformat.encode_bytes({"w.weight": w}, coder="context", smallest=False)).tensors[0]
    assert isinstance(t, ContextTensor) and t.counting
    old_bytes = ctxcoder.encode_tensor(_symbols("w", w)[2], t.shape, ctxcoder.negative_symbols(t.codebook),
                                       ctxcoder.TWO_RATE)
    assert t.data.size < old_bytes.size

    def file(data, counting):
        return _serialize3(Container([ContextTensor(t.name, t.dtype, t.shape, t.codebook, t.nonzeros, data, counting)],
                                     {}, None, "test", 3))

    old = file(old_bytes, False)
    assert swsformat.open(old).entry("w.weight").counting is False
    assert same_bits(swsformat.load_state_dict(old)["w.weight"], w)
    try:
        wrong = swsformat.load_state_dict(file(old_bytes, True))["w.weight"]
    except SwsError:
        return
    assert not same_bits(wrong, w)


def test_sparse_raw_with_a_stored_zero_is_refused():
    """Kind 5 stores non-zeros only: a flagged position whose bytes are zero is another
    encoding of the same tensor, and a reader refuses it (found by an independent decoder)."""
    from swsformat.container import SparseRawTensor

    b = torch.tensor([0.0] * 20 + [0.5, -1.0], dtype=torch.float16)
    c = parse(swsformat.encode_bytes({"b": b}))
    t = c.tensors[0]
    assert isinstance(t, SparseRawTensor)
    values = t.values.copy()
    values[:2] = 0  # the first stored element becomes +0.0
    c.tensors[0] = SparseRawTensor(t.name, t.dtype, t.shape, t.nonzeros, t.positions, values)
    with pytest.raises(SwsFormatError, match="stored element is zero"):
        swsformat.load_state_dict(_serialize3(c))
