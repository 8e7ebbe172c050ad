"""Format stability: committed files of every version decode, and today's writer makes the same bytes.

Set SWSFORMAT_REGEN_GOLDEN=1 to write the current writer's file (only when the format gains
a version or a kind; files of older versions and kinds are never rewritten). ``golden-v3.sws``
is version 3 as first written (context kind 2); ``golden-v3-kinds45.sws`` is what the writer
makes today (context kind 4, sparse raw kind 5).
"""

from __future__ import annotations

import os

import pytest
import torch

import swsformat
from swsformat.container import decode_header, parse, read_prelude, serialize
from swsformat.encoder import to_container
from swsformat.spec import FORMAT_VERSION, VERSIONS

from .conftest import DATA, quantized

GOLDEN = DATA / f"golden-v{FORMAT_VERSION}-kinds45.sws"
# The settings the golden files were written with (the encoder's defaults were these before 0.3).
GOLDEN_SETTINGS = {"index_bits": None, "smallest": False}


def golden_settings(version: int) -> dict:
    """Version 3 codes two tensors with Huffman so that the file holds both coders."""
    if version < 3:
        return GOLDEN_SETTINGS
    return {**GOLDEN_SETTINGS, "coder": {"gap.weight": "huffman", "half.weight": "huffman"}}


def golden_state_dict(version: int = FORMAT_VERSION, kinds45: bool = True) -> dict[str, torch.Tensor]:
    t = torch.zeros(3, 40)
    t[0, 39] = 0.5
    t[2, [0, 1, 35]] = torch.tensor([-0.25, 0.5, -0.25])
    sd = {
        "conv.weight": quantized((6, 2, 3, 3), 0.3, 5, seed=3),
        "conv.bias": torch.tensor([0.1, -0.2, 0.3, 0.0, 1.0, -1.0]),
        "fc.weight": quantized((10, 54), 0.15, 7, seed=4),
        "fc.bias": torch.arange(10, dtype=torch.float16),
        "gap.weight": t,
        "half.weight": quantized((4, 9), 0.5, 3, seed=5, dtype=torch.bfloat16),
        "steps": torch.tensor(7),
    }
    if version >= 3:
        sd["tied.weight"] = sd["fc.weight"]  # one tensor under two names: stored once
    if version >= 3 and kinds45:  # biases of pruned units: only the non-zeros' bytes are stored
        sd["pruned.bias"] = torch.tensor([0.0] * 12 + [0.125, -3.5, 0.0, 0.0, 7.0, 0.0, 0.0, 0.0, 1e-3, 0.0, 0.0])
    return sd


@pytest.mark.parametrize("version, kinds45", [(v, False) for v in VERSIONS] + [(FORMAT_VERSION, True)])
def test_golden_file_decodes_to_the_same_tensors(version, kinds45):
    if os.environ.get("SWSFORMAT_REGEN_GOLDEN") and kinds45:
        swsformat.encode(golden_state_dict(), GOLDEN, metadata={"purpose": "golden"}, **golden_settings(version))
    path = GOLDEN if kinds45 else DATA / f"golden-v{version}.sws"
    assert parse(path.read_bytes()).version == version
    sd = swsformat.load_state_dict(path)
    want = golden_state_dict(version, kinds45)
    assert list(sd) == list(want)
    for k in want:
        assert sd[k].dtype == want[k].dtype and torch.equal(sd[k], want[k]), k
    if version >= 3:
        assert sd["tied.weight"] is sd["fc.weight"]
        f = swsformat.open(path)
        kinds = {(f.entry(k).kind, f.entry(k).coder, f.entry(k).counting) for k in sd if f.entry(k).kind != "alias"}
        # the file exercises every coder of its time
        assert kinds == ({("raw", "huffman", False), ("sws", "huffman", False), ("sws", "context", True),
                          ("raw", "sparse", True)} if kinds45 else
                         {("raw", "huffman", False), ("sws", "huffman", False), ("sws", "context", False)})


def _rewrite(version: int) -> tuple[bytes, bytes]:
    """Today's writer on the golden tensors at ``version``, with the golden file's library
    string (the only field allowed to differ between releases), and the golden file."""
    golden = (GOLDEN if version == FORMAT_VERSION else DATA / f"golden-v{version}.sws").read_bytes()
    c = to_container(golden_state_dict(version), metadata={"purpose": "golden"}, version=version,
                     **golden_settings(version))
    c.library = parse(golden).library
    return serialize(c), golden


def test_writer_still_produces_the_v1_golden_bytes():
    data, golden = _rewrite(1)
    assert data == golden


def test_writer_still_produces_the_current_golden_file():
    """Same prelude fields, same decoded header, same data area. The deflated header bytes
    themselves may differ with another zlib build, which SPEC.md allows."""
    data, golden = _rewrite(FORMAT_VERSION)
    a, b = read_prelude(data), read_prelude(golden)
    assert (a.version, a.coding, a.size) == (b.version, b.coding, b.size)
    assert decode_header(data, a) == decode_header(golden, b)
    assert data[a.data_start :] == golden[b.data_start :]


def test_exact_bytes_of_a_tiny_layer():
    """One layer small enough to check by hand against SPEC.md."""
    w = torch.tensor([[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, -0.5]])
    c = swsformat.encode_bytes({"w.weight": w}, index_bits=2, metadata={}, smallest=False, version=2)
    from swsformat.container import parse

    t = parse(c).tensors[0]
    # Two rows with one entry each: counts 1,1 in 1 bit -> 0b11000000.
    assert t.row_bits == 1 and bytes(t.row_counts) == b"\xc0"
    # Gaps 1 (row 0: column 1) and 3 (row 1: column 3): two used symbols of length 1;
    # canonical codes give symbol 1 -> 0, symbol 3 -> 1, so the stream is 0b01000000.
    assert list(t.gaps.code_lengths) == [0, 1, 0, 1] and bytes(t.gaps.data) == b"\x40"
    # Codebook sorted by bit pattern: 0.5 (0x3f000000) before -0.5 (0xbf000000).
    assert list(t.codebook) == [0x3F000000, 0xBF000000]
    assert list(t.values.code_lengths) == [0, 1, 1] and bytes(t.values.data) == b"\x40"
    assert c[:8] == b"\x89SWS\r\n\x1a\n" and c[8:10] == b"\x02\x00" and c[11] == 0
    p = read_prelude(c)
    # Version 2: the three coded sections follow each other without alignment padding.
    assert [t.row_counts.size, t.gaps.data.size, t.values.data.size] == [1, 1, 1]
    assert len(c) == p.data_start + 3
