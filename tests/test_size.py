"""Size accounting of real files: streams near their entropy, small fixed overhead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import swsformat
from swsformat.container import parse
from swsformat.retrain.models import build_model, compressible_parameters


def test_streams_within_two_percent_of_entropy():
    # Known symbol frequencies: 15 shared values with a skewed but not degenerate distribution,
    # positions of 10% density, so both streams have several bits of entropy per symbol.
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.2, 0.15, 0.12, 0.1, 0.08, 0.07, 0.06, 0.05, 0.04, 0.035, 0.025, 0.02, 0.015, 0.01, 0.01])
    values = torch.linspace(-0.7, 0.7, 16)
    values = values[values != 0][:15]
    idx = torch.multinomial(p, 500 * 800, replacement=True, generator=g).reshape(500, 800)
    w = torch.where(torch.rand(500, 800, generator=g) < 0.1, values[idx], torch.zeros(()))
    rep = swsformat.size_report(swsformat.encode_bytes({"fc.weight": w}))
    t = rep["tensors"][0]
    assert t["value_bits"] <= 1.02 * t["value_entropy_bits"]
    assert t["gap_bits"] <= 1.02 * t["gap_entropy_bits"]
    # The report's parts add up to the real file.
    parts = t["row_bits"] + t["gap_bits"] + t["value_bits"] + t["codebook_bits"]
    assert parts // 8 + rep["overhead_bytes"] == rep["file_bytes"]


def test_constant_gap_stream_costs_one_bit_per_symbol():
    w = torch.zeros(4, 64)
    w[:, 1::2] = 0.5  # every gap is 1: zero entropy, but a real code spends a bit per symbol
    t = swsformat.size_report(swsformat.encode_bytes({"fc.weight": w}, index_bits=3, coder="huffman"))["tensors"][0]
    assert t["gap_entropy_bits"] == 0
    assert f"{t['gap_entropy_bits']:.0f}" == "0"  # not "-0" in `sws info`
    assert t["gap_bits"] == 128  # 128 entries, 1 bit each


@pytest.mark.parametrize("name", ["lenet300-100", "lenet5-caffe", "tutorial-net"])
def test_overhead_under_1kib_per_layer(name):
    model = build_model(name)
    with torch.no_grad():
        for _, p in compressible_parameters(model):
            p.copy_(torch.where(p.abs() > 0.9 * p.abs().max(), torch.sign(p) * 0.05, torch.zeros(())))
    rep = swsformat.size_report(swsformat.encode_bytes(model, index_bits="auto"))
    layers = sum(1 for t in rep["tensors"] if t["kind"] == "sws")
    assert rep["overhead_bytes"] < 1024 * layers
    # Code tables, codebooks and per-tensor header entries are reported per tensor.
    assert all(t["header_bits"] > 0 for t in rep["tensors"])


def test_auto_index_bits_never_larger_than_fixed_defaults():
    g = torch.Generator().manual_seed(3)
    for density in (0.001, 0.01, 0.1, 0.5):
        w = torch.where(torch.rand(300, 784, generator=g) < density, torch.tensor(0.25), torch.zeros(()))
        fixed = len(swsformat.encode_bytes({"fc.weight": w}))
        auto = len(swsformat.encode_bytes({"fc.weight": w}, index_bits="auto"))
        assert auto <= fixed, density


def test_report_compression_rates():
    w = torch.zeros(100, 100)
    w[0, :10] = 0.5
    rep = swsformat.size_report(swsformat.encode_bytes({"fc.weight": w, "fc.bias": torch.zeros(100)}))
    assert rep["fp32_bytes"] == 100 * 100 * 4 + 100 * 4
    assert rep["compression_rate"] == pytest.approx(rep["fp32_bytes"] / rep["file_bytes"])
    assert rep["nonzero_fraction"] == pytest.approx(10 / 10000)
    assert np.isfinite(rep["paper_compression_rate"]) and rep["paper_compression_rate"] > rep["compression_rate"]


def test_smallest_stores_tensors_raw_when_coding_does_not_pay():
    """``smallest=True``: a tiny selected tensor goes raw, a large sparse one stays coded, the
    file is no larger than without the option, and every tensor decodes bit for bit."""
    g = torch.Generator().manual_seed(0)
    big = torch.zeros(200, 300)
    idx = torch.randint(0, big.numel(), (600,), generator=g)
    big.view(-1)[idx] = torch.tensor([-0.5, 0.25, 0.75])[torch.randint(0, 3, (600,), generator=g)]
    sd = {"big.weight": big, "tiny.bias": torch.tensor([0.1, -0.2, 0.3])}
    names = set(sd)
    plain = swsformat.encode_bytes(sd, compress=names, smallest=False)
    small = swsformat.encode_bytes(sd, compress=names)  # smallest=True is the default
    assert len(small) < len(plain)
    kinds = {t.name: t.kind for t in parse(small).tensors}
    assert kinds == {"big.weight": "sws", "tiny.bias": "raw"}
    for name, t in swsformat.load(small).items():
        assert torch.equal(t.view(torch.int32), sd[name].view(torch.int32))


def test_rates_against_float32_and_the_tensors_own_dtypes():
    from swsformat.quantize import prune_and_cluster

    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(100, 100, generator=g).half(), "a.bias": torch.randn(100, generator=g).half()}
    data = swsformat.encode_bytes(prune_and_cluster(sd, 0.5, 16))
    rep = swsformat.size_report(data)
    assert rep["dtype_bytes"] == 2 * 10100 and rep["fp32_bytes"] == 4 * 10100
    assert rep["dtype_compression_rate"] == pytest.approx(rep["compression_rate"] / 2)
    assert rep["dtype_compression_rate"] == pytest.approx(rep["dtype_bytes"] / len(data))


def test_a_shared_codebook_counts_once_in_the_report(tmp_path):
    """Format 3 stores a codebook in the first tensor's index record; the others refer to it.
    The report charges it once: the tensors' totals and the overhead add up to the file."""
    import swsformat
    from swsformat.quantize import prune_and_cluster

    torch.manual_seed(0)
    sd = prune_and_cluster({f"l{i}.weight": torch.randn(64, 64) for i in range(4)}, prune=0.9, clusters=8)
    swsformat.encode(sd, tmp_path / "m.sws")
    r = swsformat.size_report(tmp_path / "m.sws")
    assert [t["codebook_bits"] for t in r["tensors"]] == [8 * 32, 0, 0, 0]
    assert r["overhead_bytes"] > 0
    assert sum(t["total_bits"] for t in r["tensors"]) // 8 < r["file_bytes"]


def test_nonzero_fraction_counts_weights_stored_raw_and_nothing_else():
    big = torch.zeros(64, 64)
    big[0, :8] = 0.25
    sd = {"big.weight": big, "small.weight": torch.tensor([[0.5, 0.0], [-0.0, 0.0]]), "b.bias": torch.ones(3),
          "scale": torch.ones(4, 4)}
    rep = swsformat.size_report(swsformat.encode_bytes(sd))
    kinds = {t["name"]: t["kind"] for t in rep["tensors"]}
    assert kinds["big.weight"] == "sws" and kinds["small.weight"] == "raw"  # a 2x2 weight is cheaper raw
    assert (rep["weights"], rep["weight_nonzeros"]) == (4096 + 4, 8 + 1)
    assert rep["nonzero_fraction"] == 9 / 4100 and rep["coded_weights"] == 4096
    assert swsformat.size_report(swsformat.encode_bytes({"b.bias": torch.ones(3)}))["nonzero_fraction"] is None


def test_a_coded_negative_zero_is_no_weight():
    w = torch.zeros(30, 20)
    w[:, :2] = 0.5
    w[:, 2:6] = -0.0
    with pytest.warns(UserWarning, match="negative zeros"):
        data = swsformat.encode_bytes({"fc.weight": w}, smallest=False, coder="huffman")
    rep = swsformat.size_report(data)
    assert rep["tensors"][0]["kind"] == "sws" and rep["weight_nonzeros"] == 60
