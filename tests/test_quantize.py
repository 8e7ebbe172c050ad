"""Post-training pruning and k-means: per-layer pruning, ties, NaN, and the layers real models have."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import swsformat
from swsformat.quantize import keep_mask, kmeans_1d, prune_and_cluster, snap


def nonzero_fraction(t: torch.Tensor) -> float:
    return float(t.count_nonzero()) / t.numel()


def test_model_scope_ranks_all_weights_but_never_empties_a_layer():
    g = torch.Generator().manual_seed(0)
    sd = {"big.weight": torch.randn(200, 100, generator=g), "small.weight": 0.01 * torch.randn(50, 100, generator=g)}
    out = prune_and_cluster(sd, prune=0.9, clusters=8)
    # one threshold alone would zero all of small.weight: it keeps a quarter of its 10% share
    assert nonzero_fraction(out["small.weight"]) == pytest.approx(0.025)
    assert nonzero_fraction(out["big.weight"]) == pytest.approx(2500 / 20000)  # the model's 10%, all here
    assert nonzero_fraction(prune_and_cluster(sd, prune=0.9, clusters=8, min_layer_keep=0.0)["small.weight"]) == 0
    each = prune_and_cluster(sd, prune=0.9, clusters=8, prune_scope="layer")
    assert nonzero_fraction(each["small.weight"]) == pytest.approx(0.1)
    assert nonzero_fraction(each["big.weight"]) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="prune_scope"):
        prune_and_cluster(sd, prune_scope="global")


def test_model_scope_prunes_big_layers_more():
    g = torch.Generator().manual_seed(0)
    sd = {"wide.weight": 0.03 * torch.randn(256, 784, generator=g), "head.weight": 0.3 * torch.randn(10, 64, generator=g)}
    out = prune_and_cluster(sd, prune=0.9, clusters=8)
    assert nonzero_fraction(out["head.weight"]) > 0.5 and nonzero_fraction(out["wide.weight"]) < 0.1


def test_ties_cannot_wipe_a_layer():
    sd = {"const.weight": torch.full((10, 10), 0.5)}
    out = prune_and_cluster(sd, prune=0.9, clusters=4)["const.weight"]
    assert int(out.count_nonzero()) == 10 and set(out.unique().tolist()) == {0.0, 0.5}
    assert keep_mask(torch.ones(7).numpy(), 0.5).sum() == 4
    assert keep_mask(torch.ones(7).numpy(), 0.0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_names_the_tensor(bad):
    w = torch.randn(4, 4)
    w[1, 2] = bad
    with pytest.raises(swsformat.SwsEncodeError, match="tensor 'b.weight' holds 1 NaN or infinite"):
        prune_and_cluster({"a.weight": torch.randn(3, 3), "b.weight": w}, prune=0.5, clusters=4)


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lstm = nn.LSTM(16, 32, num_layers=2, bidirectional=True)
        self.gru = nn.GRU(64, 16)
        self.attn = nn.MultiheadAttention(16, 4)
        self.out = nn.Linear(16, 50)


def test_rnn_attention_and_embedding_weights_are_coded():
    torch.manual_seed(0)
    model = Recurrent()
    sd = prune_and_cluster(model.state_dict(), prune=0.8, clusters=16)
    data = swsformat.encode_bytes(sd)
    f = swsformat.open(data)
    coded = {n for n in f.keys() if f.entry(n).kind == "sws"}
    for name in ("emb.weight", "lstm.weight_ih_l0", "lstm.weight_hh_l1_reverse", "gru.weight_hh_l0",
                 "attn.in_proj_weight", "attn.out_proj.weight", "out.weight"):
        assert name in coded, name
    assert not any(n.endswith("bias") or "bias_" in n for n in coded)
    back = swsformat.load_state_dict(data)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    # a quarter of the float32 bytes at most, biases raw
    assert len(data) < sum(t.numel() for t in sd.values()) * 4 / 4


@pytest.mark.parametrize("scale", [0.1, 1e-3])
def test_a_layer_the_floor_saves_keeps_values_of_its_own_scale(scale):
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(1000, 1000, generator=g) * 0.05, "b.weight": torch.randn(100, 100, generator=g) * 0.05 * scale}
    out = prune_and_cluster(sd, prune=0.9, clusters=16)["b.weight"]
    kept = out != 0
    assert int(kept.sum()) == 250
    relative = float((out[kept] - sd["b.weight"][kept]).abs().mean() / sd["b.weight"][kept].abs().mean())
    assert relative < 0.1  # snapped to values near its own, not to the big layer's codebook


def test_tied_weights_stay_tied_through_post_training_quantization(tmp_path):
    from torch import nn

    emb = nn.Embedding(200, 32)
    sd = {"emb.weight": emb.weight.detach(), "head.weight": emb.weight.detach(), "other.weight": torch.randn(32, 32)}
    out = swsformat.quantize.prune_and_cluster(sd, prune=0.8, clusters=8)
    assert out["head.weight"] is out["emb.weight"]
    f = swsformat.open(swsformat.encode_bytes(out))
    assert f.entry("head.weight").alias_of == "emb.weight"
    # ranked once: 80% of the 200*32 + 32*32 distinct weights are zero, not of 2*200*32 + 32*32
    nz = sum(int((out[k] != 0).sum()) for k in ("emb.weight", "other.weight"))
    assert abs(nz - 0.2 * (200 * 32 + 32 * 32)) <= 2


def test_working_memory_is_a_fraction_of_the_model(monkeypatch):
    """Ranking and clustering go chunk by chunk in the weights' dtype: the numpy work of
    prune_and_cluster stays far below the model's size (it was 6x in float64 copies), and
    ``inplace=True`` writes the results into the given tensors."""
    import tracemalloc

    from swsformat import quantize

    monkeypatch.setattr(quantize, "CHUNK", 1 << 16)
    monkeypatch.setattr(quantize, "KMEANS_SAMPLE", 1 << 16)  # k-means works on a sample of fixed size
    g = torch.Generator().manual_seed(0)
    sd = {f"l{i}.weight": 0.02 * torch.randn(1024, 1024, generator=g) for i in range(8)}
    reference = prune_and_cluster({k: v.clone() for k, v in sd.items()}, prune=0.9, clusters=16)
    model_bytes = sum(t.numel() * t.element_size() for t in sd.values())
    tracemalloc.start()
    out = prune_and_cluster(sd, prune=0.9, clusters=16, inplace=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 0.1 * model_bytes
    assert all(out[k] is sd[k] and torch.equal(out[k], reference[k]) for k in sd)
    assert sum(int(t.count_nonzero()) for t in out.values()) == int(0.1 * 8 * 1024 * 1024) + 1


def lloyd_in_numpy(values: np.ndarray, k: int, init: str, iters: int = 30) -> np.ndarray:
    """Lloyd's k-means as ``kmeans_1d`` defines it, with numpy's searchsorted and bincount."""
    if init == "linear":
        centres = np.unique(np.linspace(values.min(), values.max(), k))
    else:
        centres = np.unique(np.quantile(values, (np.arange(k) + 0.5) / k))
    for _ in range(iters):
        edges = (centres[1:] + centres[:-1]) / 2
        idx = np.searchsorted(edges, values)
        sums = np.bincount(idx, weights=values, minlength=centres.size)
        counts = np.bincount(idx, minlength=centres.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centres)
        if np.allclose(new, centres):
            break
        centres = new
    return np.unique(centres)


@pytest.mark.parametrize("k", [1, 2, 16, 33, 255])
@pytest.mark.parametrize("init", ["quantile", "linear"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_kmeans_is_bit_for_bit_numpys_lloyd(k, init, dtype):
    """The compiled assignment step (a count below 33 edges, a binary search above) sums in the
    values' order, as np.bincount does, so the centres are the same bits."""
    rng = np.random.default_rng(k)
    v = np.concatenate([rng.standard_normal(20000) * 0.05, rng.standard_normal(50) * 0.5, [0.0, 0.0, 1e-3]])
    v = v.astype(dtype)
    got = kmeans_1d(v, k, init=init)
    want = lloyd_in_numpy(v, k, init)
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_clustered_weights_are_the_nearest_centres_of_the_kept_ones():
    """Every kept weight becomes its nearest centre of the shared codebook (np.searchsorted
    between midpoints), every pruned one an exact zero."""
    g = torch.Generator().manual_seed(3)
    sd = {"a.weight": torch.randn(300, 200, generator=g), "b.weight": torch.randn(64, 300, generator=g)}
    out = prune_and_cluster(sd, prune=0.8, clusters=12)
    centres = np.unique(np.concatenate([out[k][out[k] != 0].double().numpy() for k in sd]))
    assert centres.size == 12
    for k, t in sd.items():
        kept = out[k] != 0
        assert int(kept.sum()) > 0.15 * t.numel()
        assert torch.equal(out[k][kept], torch.from_numpy(snap(t[kept].double().numpy(), centres)).float())


def test_a_tie_to_a_name_the_selector_skips_stays_a_tie():
    """``lin.weight`` tied to a parameter called ``codebook``: both names get the one result."""
    from .conftest import TiedToCodebook

    q = prune_and_cluster(TiedToCodebook().state_dict(), prune=0.5, clusters=4)
    assert q["codebook"] is q["lin.weight"]
    assert q["codebook"].unique().numel() <= 5


def test_prune_and_cluster_leaves_kept_tensors_as_they_are():
    torch.manual_seed(0)
    sd = {"a.weight": torch.randn(20, 20), "head.weight": torch.randn(5, 20)}
    out = prune_and_cluster(sd, prune=0.5, clusters=4, keep=["head.*"])
    assert out["head.weight"] is sd["head.weight"]
    assert torch.unique(out["a.weight"]).numel() <= 5


@pytest.mark.parametrize("scale", [1e-3, 1e-4])
def test_a_layer_of_another_scale_gets_its_own_codebook_without_pruning(scale):
    """No pruning, so no floor: a layer 1,000x smaller than the rest was snapped to the shared
    codebook's nearest value (relative error 16 and more); it now gets a codebook of its own."""
    g = torch.Generator().manual_seed(0)
    sd = {"a.weight": torch.randn(200, 200, generator=g), "b.weight": torch.randn(10, 200, generator=g) * scale}
    out = prune_and_cluster(sd, prune=0.0, clusters=16)
    for name in sd:
        relative = float((out[name] - sd[name]).norm() / sd[name].norm())
        assert relative < 0.15, name


def test_a_layer_clustering_would_wipe_is_an_error():
    """float16 weights symmetric about zero with one cluster: the one centre is 0, and the layer
    would leave as all zeros; that is refused by name."""
    w = torch.linspace(-1, 1, 64, dtype=torch.float16).reshape(8, 8)
    with pytest.raises(swsformat.SwsEncodeError, match="'w.weight' all zero"):
        prune_and_cluster({"w.weight": w}, prune=0.0, clusters=1)


def test_exact_zeros_stay_zero():
    """A weight that is exactly zero is never kept, so never snapped to a centre near zero: an
    already sparse model stays as sparse, and a zero-initialised layer stays zero."""
    torch.manual_seed(0)
    m = nn.Linear(64, 64)
    with torch.no_grad():
        m.weight[:, :32] = 0
    assert prune_and_cluster(m, prune=0.0, clusters=8)["weight"][:, :32].count_nonzero() == 0
    sparse = nn.Linear(64, 64)
    with torch.no_grad():
        sparse.weight.mul_(torch.rand(64, 64) < 0.3)
    out = prune_and_cluster(sparse, prune=0.5, clusters=8)["weight"]
    assert bool((out[sparse.weight == 0] == 0).all())
    assert out.count_nonzero() == sparse.weight.count_nonzero()  # fewer non-zeros than the share kept
    zero_init = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32))
    nn.init.zeros_(zero_init[2].weight)
    for kwargs in ({}, {"per_layer": True}, {"prune_scope": "layer"}):
        out = prune_and_cluster(zero_init, prune=0.5, clusters=8, **kwargs)
        assert out["2.weight"].count_nonzero() == 0 and out["0.weight"].count_nonzero() > 0


def test_inplace_writes_channels_last_kernels_and_refuses_csr(tmp_path):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    want = prune_and_cluster(dense, prune=0.8, clusters=8)
    cl = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3))
    cl.load_state_dict(dense.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    prune_and_cluster(cl, prune=0.8, clusters=8, inplace=True)
    assert all(torch.equal(want[k], v) for k, v in cl.state_dict().items())
    assert cl[2].weight.is_contiguous(memory_format=torch.channels_last)
    net = nn.Sequential(nn.Linear(16, 16))
    prune_and_cluster(net, prune=0.5, clusters=4, inplace=True)
    swsformat.encode(net, tmp_path / "n.sws")
    loaded = swsformat.load_model(tmp_path / "n.sws", nn.Sequential(nn.Linear(16, 16)), sparse=True)
    with pytest.raises(swsformat.SwsError, match="'0.weight'.*sparse=True"):
        prune_and_cluster(loaded, prune=0.9, clusters=4, inplace=True)
    assert prune_and_cluster(loaded, prune=0.9, clusters=4)["0.weight"].count_nonzero() <= 26


def test_keep_or_select_any_name_of_a_tie_decides_for_all():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight
            self.fc = nn.Linear(16, 16)

    torch.manual_seed(0)
    m = Tied()
    before = m.emb.weight.detach().clone()
    out = prune_and_cluster(m, prune=0.5, clusters=8, keep=["head.*"], inplace=True)
    assert torch.equal(m.emb.weight, before) and torch.equal(out["head.weight"], before)
    assert m.fc.weight.unique().numel() <= 9
    # A tie whose first name is no weight (a custom parameter) is quantized for the layer's sake.
    sd = {"codebook": torch.randn(16, 16), "fc.bias": torch.zeros(16)}
    sd["fc.weight"] = sd["codebook"]
    out = prune_and_cluster(sd, prune=0.5, clusters=4)
    assert out["codebook"] is out["fc.weight"] and out["codebook"].unique().numel() <= 5


def test_bad_arguments_are_sws_errors():
    with pytest.raises(swsformat.SwsError, match="'step' is not a"):
        prune_and_cluster({"a.weight": torch.randn(4, 4), "step": 3}, prune=0.5, clusters=4)
    with pytest.raises(swsformat.SwsError, match="'a.weight'.*not floating point"):
        prune_and_cluster({"a.weight": torch.ones(4, 4, dtype=torch.int32)}, prune=0.5, clusters=4,
                          compress=["a.weight"])
    with pytest.raises(swsformat.SwsError, match="prune must be"):
        prune_and_cluster({"a.weight": torch.randn(4, 4)}, prune=1.0, clusters=4)


def test_inplace_falls_back_for_views_of_one_buffer_and_changes_nothing_it_refuses():
    torch.manual_seed(0)
    b = torch.randn(64, 64)
    views = {"a.weight": b, "b.weight": b.t(), "c.weight": b[:32]}
    want = prune_and_cluster({k: v.clone() for k, v in views.items()}, prune=0.5, clusters=4, per_layer=True,
                             prune_scope="layer")
    got = prune_and_cluster(views, prune=0.5, clusters=4, per_layer=True, prune_scope="layer", inplace=True)
    assert all(torch.equal(want[k], got[k]) for k in want) and all(got[k].unique().numel() <= 5 for k in got)
    expanded = {"fc.weight": torch.randn(1, 64).expand(32, 64)}
    assert prune_and_cluster(expanded, prune=0.5, clusters=4, inplace=True)["fc.weight"].unique().numel() <= 5
    m = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).half()
    with torch.no_grad():
        w = torch.rand(8, 4).half() + 0.5
        m[1].weight.copy_(torch.cat([w, -w], 1))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(swsformat.SwsError, match="'1.weight' all zero.*nothing was changed"):
        prune_and_cluster(m, prune=0, clusters=1, per_layer=True, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    with pytest.raises(swsformat.SwsError, match="integer"):
        prune_and_cluster(m, prune=0.5, clusters=2.5)
    huge = prune_and_cluster({"a.weight": torch.randn(50, 50, dtype=torch.float64) * 1e306}, prune=0, clusters=4)
    assert torch.isfinite(huge["a.weight"]).all() and huge["a.weight"].unique().numel() == 4
