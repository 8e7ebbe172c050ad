"""Sparse CSR inference gives the dense model's outputs."""

from __future__ import annotations

import warnings

import pytest
import torch

import swsformat
from swsformat.retrain.models import MODELS, build_model

from .conftest import quantized_model


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_sparse_model_matches_dense(name, device, tmp_path):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = quantized_model(name)
    path = tmp_path / "m.sws"
    swsformat.encode(model, path)
    dense = swsformat.load_model(path, device=device)
    sparse = swsformat.load_model(path, device=device, sparse=True)
    assert any(b.layout == torch.sparse_csr for b in sparse.buffers())
    x = torch.randn(17, 1, 28, 28, device=device)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sparse(x[:1]), dense(x[:1]), rtol=1e-4, atol=1e-5)


def test_sparse_conv_with_padding_and_dilation():
    from swsformat.sparse import SparseConv2d

    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1, dilation=2)
    with torch.no_grad():
        conv.weight.mul_((torch.rand_like(conv.weight) < 0.3).float())
    x = torch.randn(2, 3, 11, 9)
    torch.testing.assert_close(SparseConv2d(conv)(x), conv(x), rtol=1e-4, atol=1e-5)


def _two_layer_file(tmp_path, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    with torch.no_grad():
        model[0].weight.copy_(torch.where(torch.rand(32, 64, generator=g) < 0.02, 0.5, 0.0))  # 2% dense
        model[2].weight.copy_(torch.where(torch.rand(8, 32, generator=g) < 0.6, -0.25, 0.0))  # 60% dense
    model = model.to(dtype)
    path = tmp_path / "two.sws"
    swsformat.encode(model, path)
    return model, path


def test_auto_uses_csr_only_where_measured_faster(tmp_path, monkeypatch):
    from swsformat import sparse as sparse_mod

    monkeypatch.setitem(sparse_mod.CROSSOVER, "cpu", {1: 0.1, 64: 0.0})
    model, path = _two_layer_file(tmp_path)
    fresh = lambda: torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))  # noqa: E731
    auto = swsformat.load_model(path, fresh(), sparse="auto")
    assert auto.sws_layouts["0"] == "csr" and auto.sws_layouts["2"].startswith("dense: density 0.6")
    big_batch = swsformat.load_model(path, fresh(), sparse="auto", batch_size=256)
    assert all(v.startswith("dense") for v in big_batch.sws_layouts.values())
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(auto(x), model(x), rtol=1e-5, atol=1e-6)
    monkeypatch.setitem(sparse_mod.CROSSOVER, "cpu", {})
    assert sparse_mod.crossover_density("cpu", 1) == 0.0 and sparse_mod.crossover_density("cuda", 1) == 0.0


def test_sparse_true_keeps_half_precision_layers_dense_on_cpu(tmp_path):
    model, path = _two_layer_file(tmp_path, torch.float16)
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).half()
    with pytest.warns(UserWarning, match="kept dense.*0, 2"):
        loaded = swsformat.load_model(path, fresh, sparse=True)
    assert set(loaded.sws_layouts.values()) == {"dense: no CSR matmul for torch.float16 on cpu"}
    x = torch.randn(3, 64, dtype=torch.float16)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="sparse must be"):
        swsformat.load_model(path, fresh, sparse="yes")


@pytest.mark.slow
def test_gpu_benchmark_script_runs_at_toy_size(tmp_path):
    """benchmarks/gpu_sparse.py is prepared for a lent GPU; here it runs at toy sizes on CPU."""
    pytest.importorskip("safetensors")
    import subprocess
    import sys

    from .conftest import ROOT

    out = tmp_path / "gpu.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_sparse.py"), "--smoke", "--device", "cpu",
                        "--json", str(out), "--table", str(tmp_path / "gpu.md")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import json

    res = json.loads(out.read_text())
    assert res["kernels"] and all(row["dense_s"] > 0 and row["csr_s"] > 0 for row in res["kernels"])
    assert all(v["state_dict_bit_exact"] and v["csr_bit_exact"] for k, v in res["correctness"].items() if k.endswith(".sws"))
    assert res["correctness"]["gpt2-shaped"]["max_abs_diff_dense"] == 0.0
    assert set(next(iter(res["first_output"].values()))) >= {"warm_sws_s", "fresh_safetensors_s"}


@pytest.mark.parametrize("what", ["model", "state_dict"])
def test_sparse_loaded_model_re_encodes_to_the_same_tensors(what, tmp_path):
    model = quantized_model("lenet300-100", density=0.05, k=9)
    path = tmp_path / "a.sws"
    swsformat.encode(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = (swsformat.load_model(path, build_model("lenet300-100"), sparse=True) if what == "model"
                  else swsformat.load_state_dict(path, sparse=True))
    assert any(t.layout == torch.sparse_csr for t in (loaded.state_dict() if what == "model" else loaded).values())
    swsformat.encode(loaded, tmp_path / "b.sws")
    a, b = swsformat.load_state_dict(path), swsformat.load_state_dict(tmp_path / "b.sws")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if what == "model":  # same tensors, same architecture record: the same file
        assert (tmp_path / "b.sws").read_bytes() == path.read_bytes()


def test_sparse_conv_takes_unbatched_input_and_load_model_uses_the_files_csr(tmp_path):
    model = quantized_model("lenet5-caffe", density=0.05, k=9)
    path = tmp_path / "l5.sws"
    swsformat.encode(model, path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sparse = swsformat.load_model(path, sparse=True)
    x = torch.randn(1, 28, 28)
    assert torch.allclose(sparse.conv1(x), model.conv1(x), atol=1e-5)
    from_file = swsformat.load_state_dict(path, sparse=True)["conv2.weight"]
    assert torch.equal(sparse.conv2.weight.col_indices(), from_file.col_indices())
    assert torch.equal(sparse.conv2.weight.values(), from_file.values())


def test_layers_a_csr_weight_would_break_stay_dense_and_are_listed(tmp_path):
    """A weight_norm'd Linear (its hook sets the weight), the sublayers of a
    TransformerEncoderLayer (its fused eval path reads them) and a Conv1d (no CSR version)
    stay dense, are named in the layouts and the warning, and the model computes as the dense one."""
    from torch import nn

    torch.manual_seed(0)

    def make() -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's deprecation of the old weight_norm
            return nn.ModuleDict({
                "wn": nn.utils.weight_norm(nn.Linear(8, 8)),
                "enc": nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 1,
                                             enable_nested_tensor=False),
                "conv": nn.Conv1d(8, 8, 3, padding=1),
                "head": nn.Linear(8, 4),
            })

    def run(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
        h = m["enc"](m["wn"](x))
        return m["head"](m["conv"](h.transpose(1, 2)).transpose(1, 2))

    model = make().eval()
    swsformat.encode(model.state_dict(), tmp_path / "m.sws", compress=set())
    x = torch.randn(2, 5, 8)
    with pytest.warns(UserWarning, match="layers kept dense") as caught:
        sparse = swsformat.load_model(tmp_path / "m.sws", make(), sparse=True)
    message = " ".join(str(w.message) for w in caught)
    assert "wn" in message and "enc.layers.0.linear1" in message and "conv" in message
    layouts = sparse.sws_layouts
    assert layouts["head"] == "csr" and layouts["wn"].startswith("dense: forward hooks")
    assert layouts["conv"] == "dense: no CSR version of Conv1d"
    with torch.no_grad():
        torch.testing.assert_close(run(sparse, x), run(model, x))


def test_a_model_loaded_sparse_encodes_with_its_kernel_shapes(tmp_path):
    from torch import nn

    from swsformat.quantize import prune_and_cluster

    torch.manual_seed(0)

    def make() -> nn.Module:
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))

    swsformat.encode(prune_and_cluster(make().state_dict(), prune=0.9, clusters=4), tmp_path / "a.sws")
    sparse = swsformat.load_model(tmp_path / "a.sws", make(), sparse=True)
    swsformat.encode(sparse, tmp_path / "b.sws")
    again = swsformat.load_model(tmp_path / "b.sws", make())
    first = swsformat.load_state_dict(tmp_path / "a.sws")
    assert all(torch.equal(first[k], v) for k, v in again.state_dict().items())


@pytest.mark.parametrize("kind", ["encoder-layer", "linear", "lstm"])
def test_the_model_itself_is_checked_and_listed(kind, tmp_path):
    """The root module has no parent to swap it: a bare TransformerEncoderLayer keeps its
    sublayers dense (its fused eval path reads them; before, its first forward failed on CSR
    weights), and a bare Linear or LSTM is listed as dense instead of left out of the layouts."""
    from torch import nn

    torch.manual_seed(0)
    make = {"encoder-layer": lambda: nn.TransformerEncoderLayer(8, 2, 16, batch_first=True),
            "linear": lambda: nn.Linear(8, 8), "lstm": lambda: nn.LSTM(8, 8, batch_first=True)}[kind]
    model = make().eval()
    swsformat.encode(model.state_dict(), tmp_path / "m.sws", compress=set())
    with pytest.warns(UserWarning, match="layers kept dense"):
        sparse = swsformat.load_model(tmp_path / "m.sws", make(), sparse=True)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        out, ref = sparse(x), model(x)
    torch.testing.assert_close(out, ref)
    layouts = sparse.sws_layouts
    assert layouts and all(v.startswith("dense") for v in layouts.values())
    if kind == "encoder-layer":
        assert "linear1" in layouts and "self_attn.out_proj" in layouts
    else:
        assert list(layouts) == [""]


def test_a_tied_layer_stays_dense_and_keeps_its_tie(tmp_path):
    """GPT-2's head shares the embedding's weight: a CSR copy would break the tie (two tensors
    where the model has one), so that layer stays dense, said why; the others go to CSR."""
    from torch import nn

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.mid = nn.Linear(16, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.mid(self.emb(ids)))

    torch.manual_seed(0)
    model = Tied().eval()
    swsformat.encode(model, tmp_path / "t.sws", compress=set())
    with pytest.warns(UserWarning, match="head"):
        sparse = swsformat.load_model(tmp_path / "t.sws", Tied(), sparse=True)
    assert sparse.head.weight is sparse.emb.weight
    assert sparse.sws_layouts["mid"] == "csr" and "tied" in sparse.sws_layouts["head"]
    ids = torch.randint(0, 50, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids), model(ids))


def test_a_layer_registered_twice_is_swapped_under_both_names(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.block = torch.nn.Linear(16, 16)
            self.alias = self.block
            self.out = torch.nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.alias(x))

    torch.manual_seed(0)
    m = Twice()
    with torch.no_grad():
        m.block.weight.mul_(torch.rand(16, 16) < 0.2)
        for p in (m.block.weight, m.out.weight):
            p.copy_((p * 8).round() / 8 + 0.0)
    swsformat.encode(m, tmp_path / "t.sws")
    loaded = swsformat.load_model(tmp_path / "t.sws", Twice(), sparse=True)
    assert loaded.block is loaded.alias and loaded.sws_layouts["alias"] == "csr"
    x = torch.randn(3, 16)
    assert torch.allclose(loaded(x), m(x), atol=1e-6)
    assert swsformat.encode(loaded, tmp_path / "again.sws") == (tmp_path / "t.sws").stat().st_size
