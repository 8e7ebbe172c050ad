"""The ``sws`` command, called as ``main(argv)`` and as a real subprocess."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import swsformat
from swsformat.cli import main
from swsformat.retrain.models import build_model

from .conftest import DATA, user_module


@pytest.fixture()
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = build_model("lenet300-100")
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return path


def test_encode_info_decode_roundtrip(checkpoint, tmp_path, capsys):
    out = tmp_path / "m.sws"
    assert main(["encode", str(checkpoint), "-o", str(out), "--prune", "0.9", "--clusters", "8",
                 "--architecture", "lenet300-100"]) == 0
    printed = capsys.readouterr().out
    size, source = out.stat().st_size, checkpoint.stat().st_size
    assert f"{size} bytes, {source / size:.1f}x smaller than {checkpoint} ({source} bytes;" in printed
    assert main(["info", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert 0.09 < rep["nonzero_fraction"] < 0.11
    assert f"{rep['compression_rate']:.1f}x against float32 tensors" in printed
    assert rep["dtype_compression_rate"] == rep["compression_rate"]  # a float32 model
    assert main(["info", str(out)]) == 0
    assert "fc1.weight" in capsys.readouterr().out
    dec = tmp_path / "dense.pt"
    assert main(["decode", str(out), "-o", str(dec)]) == 0
    sd = torch.load(dec, weights_only=True)
    assert torch.equal(sd["fc1.weight"], swsformat.load_state_dict(out)["fc1.weight"])
    # The file names its architecture, so it loads with no class at hand.
    assert isinstance(swsformat.load_model(out), type(build_model("lenet300-100")))


def test_unquantized_checkpoint_gives_one_clear_line(checkpoint, tmp_path, capsys):
    assert main(["encode", str(checkpoint), "-o", str(tmp_path / "x.sws")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "distinct non-zero values" in err[0]
    assert not (tmp_path / "x.sws").exists()


@pytest.mark.parametrize(
    "argv",
    [
        ["info", "missing.sws"],
        ["info", str(DATA)],
        ["decode", str(DATA / "golden-v1.sws")[:-4] + ".nope", "-o", "x.pt"],
    ],
)
def test_bad_files_exit_nonzero_one_line(argv, capsys):
    assert main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sws: error:")


def test_corrupt_file_subprocess(tmp_path):
    bad = tmp_path / "bad.sws"
    raw = bytearray((DATA / "golden-v1.sws").read_bytes())
    raw[-3] ^= 0xFF
    bad.write_bytes(bytes(raw))
    r = subprocess.run([sys.executable, "-m", "swsformat.cli", "info", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "CRC-32 mismatch" in r.stderr and "Traceback" not in r.stderr


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["encode"])
    assert e.value.code == 2
    for sub in ("compress", "encode", "info", "decode", "eval", "bench", "plot"):
        with pytest.raises(SystemExit) as e:
            main([sub, "--help"])
        assert e.value.code == 0


def test_bench_and_plot(tmp_path, capsys):
    from swsformat.quantize import prune_and_cluster

    model = build_model("lenet5-caffe")
    path = tmp_path / "l5.sws"
    swsformat.encode(prune_and_cluster(model.state_dict(), 0.95, 8), path, architecture="lenet5-caffe")
    assert main(["bench", str(path), "--device", "cpu", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["inference"]) == {"cpu_batch1", "cpu_batch256"}
    for timing in [*res["load"].values(), res["inference"]["cpu_batch1"]["dense"]]:
        assert 0 < timing["min_s"] <= timing["p25_s"] <= timing["median_s"] <= timing["p75_s"]
    assert res["inference"]["cpu_batch1"]["sparse_speedup"] == pytest.approx(
        res["inference"]["cpu_batch1"]["dense"]["median_s"] / res["inference"]["cpu_batch1"]["sparse"]["median_s"])
    assert isinstance(res["noisy"], list)
    assert main(["bench", str(path), "--device", "cpu", "--repeat", "1"]) == 2
    assert main(["plot", str(path), "-o", str(tmp_path / "pic")]) == 0
    assert (tmp_path / "pic-histogram.png").stat().st_size > 1000
    assert (tmp_path / "pic-codebook.png").stat().st_size > 1000


def test_safetensors_in_and_out(checkpoint, tmp_path):
    """The optional extra: encode a .safetensors checkpoint, decode back to .safetensors."""
    st = pytest.importorskip("safetensors.torch")
    src = tmp_path / "model.safetensors"
    st.save_file(torch.load(checkpoint, weights_only=True), str(src))
    out = tmp_path / "m.sws"
    assert main(["encode", str(src), "-o", str(out), "--prune", "0.8", "--clusters", "16"]) == 0
    back = tmp_path / "dense.safetensors"
    assert main(["decode", str(out), "-o", str(back)]) == 0
    got = st.load_file(str(back))
    want = swsformat.load_state_dict(out)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert float((got["fc1.weight"] == 0).float().mean()) >= 0.79


def test_safetensors_metadata_is_kept_and_written_back(checkpoint, tmp_path):
    """A .safetensors input's ``__metadata__`` travels in the .sws file and comes back out."""
    st = pytest.importorskip("safetensors.torch")
    from safetensors import safe_open

    src = tmp_path / "model.safetensors"
    st.save_file(torch.load(checkpoint, weights_only=True), str(src), metadata={"format": "pt", "step": "1200"})
    out = tmp_path / "m.sws"
    assert main(["encode", str(src), "-o", str(out), "--prune", "0.8", "--clusters", "16"]) == 0
    with swsformat.open(out) as f:
        assert f.metadata()["safetensors.format"] == "pt" and f.metadata()["safetensors.step"] == "1200"
    back = tmp_path / "dense.safetensors"
    assert main(["decode", str(out), "-o", str(back)]) == 0
    with safe_open(str(back), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "step": "1200"}


def _bad_files(tmp_path):
    """A zoo of files no command may crash on."""
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04not a pickle at all" * 10)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\xff" * 64)
    corrupt = tmp_path / "corrupt.sws"
    raw = bytearray((DATA / "golden-v2.sws").read_bytes())
    raw[-3] ^= 0xFF
    corrupt.write_bytes(bytes(raw))
    noarch = tmp_path / "noarch.sws"
    swsformat.encode({"a.weight": torch.tensor([[0.0, 1.0]])}, noarch)
    badmeta = tmp_path / "badmeta.sws"
    model = build_model("lenet300-100")
    from swsformat.quantize import prune_and_cluster

    swsformat.encode(prune_and_cluster(model.state_dict(), 0.9, 4), badmeta, metadata={"sws.input": "{not json"})
    weird = tmp_path / os.fsdecode(b"\xff\xfe.sws")
    weird.write_bytes(b"junk")
    return {"garbage": garbage, "empty": empty, "bad_st": bad_st, "corrupt": corrupt, "noarch": noarch,
            "badmeta": badmeta, "weird": weird, "dir": tmp_path, "missing": tmp_path / "missing.sws"}


def _cases(f, tmp_path):
    out = str(tmp_path / "out.sws")
    nodir = str(tmp_path / "nodir" / "x.sws")
    ckpt = str(f["garbage"])
    return [
        ["compress", "--model", "bogus", "-o", out],
        ["compress", "--model", "lenet300-100", "-o", out, "--set", "bogus=1"],
        ["compress", "--model", "lenet300-100", "-o", out, "--set", "retrain.bogus=1"],
        ["compress", "--model", "lenet300-100", "-o", out, "--set", "a.b.c=1"],
        ["compress", "--model", "lenet300-100", "-o", out, "--set", "novalue"],
        ["compress", "--model", "lenet300-100", "-o", out, "--epochs", "0"],
        ["compress", "--model", "lenet300-100", "-o", out, "--tau", "nan"],
        ["compress", "--model", "lenet300-100", "-o", nodir],
        ["compress", "--model", "lenet300-100", "-o", out, "--resume"],
        ["compress", "--model", "lenet300-100", "-o", out, "--pretrained", str(f["missing"])],
        ["compress", "--model", "lenet300-100", "-o", out, "--epochs", "x"],
        ["encode", str(f["missing"]), "-o", out],
        ["encode", ckpt, "-o", out],
        ["encode", str(f["empty"]), "-o", out],
        ["encode", str(f["bad_st"]), "-o", out],
        ["encode", str(f["dir"]), "-o", out],
        ["encode", ckpt, "-o", ckpt],
        ["encode", ckpt, "-o", nodir],
        ["encode", ckpt, "-o", out, "--data", "mnist"],
        ["encode", ckpt, "-o", out, "--prune", "0.5"],
        ["encode", ckpt, "-o", out, "--prune", "2", "--clusters", "4"],
        ["encode", ckpt, "-o", out, "--architecture", "gpt2"],
        ["encode", ckpt, "-o", out, "--index-bits", "many"],
        ["encode", str(f["weird"]), "-o", out],
        ["info", str(f["missing"])],
        ["info", str(f["dir"])],
        ["info", ckpt],
        ["info", str(f["corrupt"])],
        ["info", str(f["weird"])],
        ["info", str(f["corrupt"]), "--json"],
        ["info", str(f["noarch"]), "--max-output-bytes", "-1"],
        ["info", str(f["noarch"]), "--max-output-bytes", "1"],
        ["decode", str(f["corrupt"]), "-o", str(tmp_path / "d.pt")],
        ["decode", str(f["noarch"]), "-o", str(f["noarch"])],
        ["decode", str(f["noarch"]), "-o", nodir],
        ["decode", str(f["noarch"]), "-o", str(f["dir"])],
        ["eval", str(f["noarch"])],
        ["eval", str(f["badmeta"])],
        ["eval", str(f["corrupt"])],
        ["eval", str(f["missing"])],
        ["bench", str(f["noarch"])],
        ["bench", str(f["corrupt"])],
        ["plot", str(f["corrupt"])],
        ["plot", str(f["missing"])],
        ["plot", str(f["noarch"]), "-o", str(tmp_path / "nodir" / "p")],
        ["frobnicate"],
        [],
    ]


def test_every_subcommand_fails_in_one_line(tmp_path, capsys):
    """Bad arguments and bad files: a non-zero exit, one line on stderr, no traceback, and
    nothing written (checked before any work: compress would otherwise pretrain first)."""
    files = _bad_files(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for argv in _cases(files, tmp_path):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse's own errors
            code = exc.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code not in (0, None), argv
        assert len(err) == 1 and "error:" in err[0] and "Traceback" not in err[0], (argv, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, argv


def test_garbage_checkpoint_names_the_file(tmp_path, capsys):
    files = _bad_files(tmp_path)
    assert main(["encode", str(files["garbage"]), "-o", str(tmp_path / "o.sws")]) == 2
    assert "not a readable PyTorch checkpoint" in capsys.readouterr().err


def test_info_json_is_strict_json_and_names_are_escaped(tmp_path, capsys):
    path = tmp_path / "raw.sws"
    swsformat.encode({"\x1b[31mred": torch.ones(2)}, path)  # no coded tensor: no paper rate
    assert main(["info", str(path), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert rep["paper_compression_rate"] is None
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[31mred" in out


def test_decode_is_atomic_and_refuses_its_input(tmp_path, capsys, monkeypatch):
    src = tmp_path / "m.sws"
    swsformat.encode({"a.weight": torch.tensor([[0.0, 1.0]])}, src)
    out = tmp_path / "m.pt"
    out.write_bytes(b"old")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("swsformat.files.os.fsync", full)
    assert main(["decode", str(src), "-o", str(out)]) == 1
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.sws"]
    monkeypatch.undo()
    link = tmp_path / "link.sws"
    link.symlink_to(src)
    assert main(["decode", str(link), "-o", str(src)]) == 2
    assert "is the input file" in capsys.readouterr().err


def test_decode_to_safetensors_writes_a_tie_as_a_copy(tmp_path, capsys):
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    w = torch.tensor([[0.5, 0.0], [0.0, -0.5]])
    swsformat.encode({"emb.weight": w, "head.weight": w}, tmp_path / "t.sws")
    assert main(["decode", str(tmp_path / "t.sws"), "-o", str(tmp_path / "t.safetensors")]) == 0
    assert "written as copies (safetensors has no aliases): head.weight" in capsys.readouterr().out
    back = load_file(str(tmp_path / "t.safetensors"))
    assert torch.equal(back["emb.weight"], w) and torch.equal(back["head.weight"], w)


def test_a_checkpoint_with_pickled_objects_gets_a_plain_message(tmp_path, capsys):
    import argparse

    path = tmp_path / "ck.pt"
    torch.save({"model": {"a.weight": torch.randn(4, 4)}, "args": argparse.Namespace(lr=1.0)}, path)
    assert main(["encode", str(path), "-o", str(tmp_path / "ck.sws")]) == 2
    err = capsys.readouterr().err
    assert "object of type argparse.Namespace" in err and "state_dict alone" in err and "\x1b" not in err
    assert not (tmp_path / "ck.sws").exists()


def test_max_output_bytes_flag_lets_a_trusted_file_through(tmp_path, capsys):
    path = tmp_path / "zeros.sws"
    with pytest.warns(UserWarning, match="max_output_bytes=100040008"):
        swsformat.encode({"a.weight": torch.zeros(5000, 5000)}, path, smallest=False)  # 100 MB of zeros
    assert main(["decode", str(path), "-o", str(tmp_path / "z.pt")]) == 1
    assert "--max-output-bytes" in capsys.readouterr().err
    assert main(["info", str(path), "--max-output-bytes", str(300 << 20)]) == 0


MLP = '''
from torch import nn


class Net(nn.Sequential):
    def __init__(self):
        super().__init__(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))


def broken():
    raise RuntimeError("boom")
'''


@pytest.fixture
def own_model(tmp_path, monkeypatch):
    """A user's module file and a fresh model of it; the working directory is ``tmp_path``."""
    from swsformat.retrain import data as data_mod

    if os.environ.get(data_mod.ENV_VAR):
        monkeypatch.setenv(data_mod.ENV_VAR, os.path.abspath(os.environ[data_mod.ENV_VAR]))
    monkeypatch.chdir(tmp_path)
    from torch.nn import functional as F

    ns = user_module(tmp_path, "mlp.py", MLP)
    torch.manual_seed(0)
    model = ns["Net"]()
    return model, F


@pytest.mark.slow
def test_own_module_route_measures_and_warns(small_mnist, own_model, tmp_path, capsys):
    model, F = own_model
    train, _ = small_mnist
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for idx in torch.randperm(3000).repeat(5).split(100):
        loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.save(model.state_dict(), "mlp.pt")
    assert main(["encode", "mlp.pt", "-o", "pk.sws", "--prune", "0.98", "--clusters", "4", "--module", "mlp.py:Net",
                 "--data", "mnist"]) == 0
    out, err = capsys.readouterr()
    before, after = (float(x) for x in re.search(r"test error: ([\d.]+)% before, ([\d.]+)% after", out).groups())
    assert after > before + 1 and "sws compress --module mlp.py:Net --pretrained mlp.pt" in err
    spec = swsformat.open("pk.sws").input_spec()
    assert spec["data"] == "mnist" and spec["normalization"] == "unit"
    # eval: the file names the module it was made from; --module builds it
    assert main(["eval", "pk.sws"]) == 2
    assert "pass --module mlp.py:Net" in capsys.readouterr().err
    assert main(["eval", "pk.sws", "--module", "mlp.py:Net"]) == 0
    assert f"test error {after:.2f}% on mnist" in capsys.readouterr().out
    # soft weight-sharing on the user's module, from the CLI
    assert main(["compress", "--module", "mlp.py:Net", "--pretrained", "mlp.pt", "-o", "sws.sws", "--quiet",
                 "--epochs", "2", *sum((["--set", f"{k}={v}"] for k, v in
                                        {"qat_epochs": 1, "retrain.tau": 0.002, "prior.pi_zero": 0.9, "prior.init_std": 0.05,
                                         "assign": "nearest"}.items()), [])]) == 0
    record = json.loads((tmp_path / "sws.json").read_text())
    assert record["module"] == "mlp.py:Net" and record["pretrain_epochs"] is None
    assert swsformat.open("sws.sws").metadata()["sws.module"] == "mlp.py:Net"
    assert main(["eval", "sws.sws", "--module", "mlp.py:Net"]) == 0
    assert f"test error {record['decoded_test_error']:.2f}%" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec, message",
    [("mlp.py", "expected MODULE:CALLABLE"), ("nope.py:Net", "cannot import nope.py"),
     ("mlp.py:Nett", "has no callable 'Nett'"), ("mlp.py:broken", "broken() failed (RuntimeError: boom)"),
     ("math:pi", "has no callable 'pi'")],
)
def test_module_flag_errors_are_one_line(own_model, spec, message, capsys):
    torch.save(own_model[0].state_dict(), "mlp.pt")
    code = main(["encode", "mlp.pt", "-o", "x.sws", "--module", spec])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not os.path.exists("x.sws")


def test_module_file_imports_its_siblings_and_checks_its_weights(tmp_path, monkeypatch, capsys):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "layers.py").write_text("from torch import nn\n\n\nclass Block(nn.Sequential):\n    def __init__(self):\n"
                                    "        super().__init__(nn.Flatten(), nn.Linear(784, 10))\n")
    (proj / "models.py").write_text("from __future__ import annotations\n\nfrom dataclasses import InitVar, dataclass\n\n"
                                    "from layers import Block\n\n\n@dataclass\nclass Cfg:\n    x: InitVar[int] = 0\n\n\n"
                                    "def Net():\n    Cfg()\n    return Block()\n\n\ndef Norm():\n"
                                    "    from torch import nn\n    return nn.LayerNorm(4)\n")
    monkeypatch.chdir(tmp_path)
    from swsformat.cli import import_factory

    assert isinstance(import_factory("proj/models.py:Net")(), torch.nn.Sequential)
    assert main(["compress", "--module", "proj/models.py:Norm", "-o", "n.sws"]) == 2
    assert "has no linear, conv" in capsys.readouterr().err


def test_options_that_cannot_work_are_refused_first(tmp_path, capsys):
    out = str(tmp_path / "x.sws")
    assert main(["compress", "--model", "lenet300-100", "-o", out, "--data-root", str(tmp_path / "nope")]) == 2
    assert "--data-root" in capsys.readouterr().err
    torch.save(build_model("lenet300-100").state_dict(), tmp_path / "p.pt")
    assert main(["compress", "--model", "lenet300-100", "-o", out, "--pretrained", str(tmp_path / "p.pt"),
                 "--pretrain-epochs", "3"]) == 2
    assert "--pretrain-epochs has no effect" in capsys.readouterr().err
    swsformat.encode(build_model("lenet300-100"), out, architecture="lenet300-100", compress=[])
    assert main(["eval", out]) == 2
    assert "records no input normalization; pass --normalization" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.json")


def test_encode_reads_save_pretrained_folders_single_and_sharded(tmp_path, capsys):
    from safetensors.torch import save_file

    sd = build_model("lenet300-100").state_dict()
    single = tmp_path / "single"
    single.mkdir()
    save_file(sd, str(single / "model.safetensors"))
    (single / "config.json").write_text("{}")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = list(sd)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    for fname, keys in shards.items():
        save_file({k: sd[k] for k in keys}, str(sharded / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    outs = []
    for folder in (single, sharded):
        out = tmp_path / f"{folder.name}.sws"
        assert main(["encode", str(folder), "-o", str(out), "--prune", "0.8", "--clusters", "8"]) == 0
        outs.append(out)
    a, b = (swsformat.load_state_dict(o) for o in outs)
    assert set(a) == set(b) == set(sd)
    assert all(torch.equal(a[k], b[k]) for k in sd)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["encode", str(empty), "-o", str(tmp_path / "e.sws")]) == 2
    assert "a folder without weights" in capsys.readouterr().err
    index["weight_map"][names[0]] = "../elsewhere.safetensors"
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["encode", str(sharded), "-o", str(tmp_path / "x.sws"), "--prune", "0.8", "--clusters", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a file name in" in err[0]
    assert not (tmp_path / "x.sws").exists()


def test_keep_leaves_matching_tensors_at_full_precision(checkpoint, tmp_path, capsys):
    """--keep PATTERN (repeatable): the tensors it matches are stored exactly as they were and
    the others are quantized; a pattern that matches nothing is a one-line error, no file."""
    out = tmp_path / "k.sws"
    assert main(["encode", str(checkpoint), "-o", str(out), "--prune", "0.5", "--clusters", "8",
                 "--keep", "fc3.*", "--keep", "fc2.weight"]) == 0
    original = torch.load(checkpoint, weights_only=True)
    loaded = swsformat.load_state_dict(out)
    assert torch.equal(loaded["fc3.weight"], original["fc3.weight"])
    assert torch.equal(loaded["fc2.weight"], original["fc2.weight"])
    assert torch.unique(loaded["fc1.weight"]).numel() <= 9
    capsys.readouterr()
    assert main(["encode", str(checkpoint), "-o", str(tmp_path / "typo.sws"), "--clusters", "8",
                 "--keep", "fc9.*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'fc9.*' matches no tensor" in err[0]
    assert not (tmp_path / "typo.sws").exists()


def test_raw_dtype_halves_the_biases(checkpoint, tmp_path, capsys):
    """--raw-dtype float16 stores the uncoded floats (here the biases) in half the bytes; a
    bias --keep names stays as it was."""
    args = ["encode", str(checkpoint), "--prune", "0.5", "--clusters", "8"]
    assert main([*args, "-o", str(tmp_path / "a.sws")]) == 0
    assert main([*args, "-o", str(tmp_path / "b.sws"), "--raw-dtype", "float16", "--keep", "fc3.bias"]) == 0
    capsys.readouterr()
    stored = {t["name"]: t["dtype"] for t in swsformat.inspect(tmp_path / "b.sws")}
    assert stored["fc1.bias"] == stored["fc2.bias"] == "float16" and stored["fc3.bias"] == "float32"
    assert (tmp_path / "b.sws").stat().st_size < (tmp_path / "a.sws").stat().st_size
    original = torch.load(checkpoint, weights_only=True)
    loaded = swsformat.load_state_dict(tmp_path / "b.sws")
    assert torch.equal(loaded["fc1.bias"], original["fc1.bias"].half())
    assert torch.equal(loaded["fc3.bias"], original["fc3.bias"])


def test_a_training_checkpoint_is_measured_by_its_model_not_its_optimizer(tmp_path, capsys):
    """{"model": ..., "optimizer": ...}: the headline rate is against the model's tensors (Adam's
    two moments would make it look three times better)."""
    torch.manual_seed(0)
    model = build_model("lenet300-100")
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, path)
    out = tmp_path / "ck.sws"
    assert main(["encode", str(path), "-o", str(out), "--prune", "0.9", "--clusters", "8"]) == 0
    printed = capsys.readouterr().out
    rep = swsformat.size_report(out)
    assert f"{rep['dtype_compression_rate']:.1f}x smaller than the model's tensors in {path}" in printed


def test_module_fits_a_save_pretrained_folder_that_drops_a_tie(tmp_path, monkeypatch, capsys):
    """A folder leaves out lm_head.weight (tied to the embedding); --module still fits it."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    ns = user_module(tmp_path, "tied.py", TIED)
    torch.manual_seed(0)
    model = ns["Net"]()
    folder = tmp_path / "folder"
    folder.mkdir()
    save_file({k: v for k, v in model.state_dict().items() if k != "head.weight"}, str(folder / "model.safetensors"))
    assert main(["encode", str(folder), "-o", "t.sws", "--prune", "0.5", "--clusters", "8", "--module", "tied.py:Net"]) == 0
    capsys.readouterr()
    loaded = swsformat.load_model("t.sws", ns["Net"]())
    assert loaded.head.weight is loaded.emb.weight and loaded.emb.weight.unique().numel() <= 9
    # --keep naming the tied weight the folder left out: with --module it keeps the tensor it
    # is tied to; without, the error says why nothing matched.
    assert main(["encode", str(folder), "-o", "k.sws", "--prune", "0.5", "--clusters", "8", "--module", "tied.py:Net",
                 "--keep", "head.*"]) == 0
    assert "head.weight is tied to emb.weight in the checkpoint, which is kept" in capsys.readouterr().err
    assert torch.equal(swsformat.load_state_dict("k.sws")["emb.weight"], model.emb.weight)
    assert main(["encode", str(folder), "-o", "n.sws", "--prune", "0.5", "--clusters", "8", "--keep", "head.*"]) == 2
    assert "leaves out weights tied to another" in capsys.readouterr().err and not (tmp_path / "n.sws").exists()


RENAMED = '''
import torch
from safetensors.torch import load_file
from torch import nn


class Net(nn.Module):
    """Like a transformers model whose current version renamed its tensors: ``from_pretrained``
    reads a folder saved under the old names."""

    config = {}

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 16)

    @classmethod
    def from_pretrained(cls, path, local_files_only=False):
        model = cls()
        sd = load_file(f"{path}/model.safetensors")
        model.load_state_dict({k.replace("old_proj.", "proj."): v for k, v in sd.items()})
        return model
'''


def test_module_reads_a_folder_saved_under_older_names(tmp_path, monkeypatch, capsys):
    """transformers 5 renamed ViT's tensors: a folder saved under the old names is read through
    the model class's from_pretrained, and the file fits the model as built today."""
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    ns = user_module(tmp_path, "renamed.py", RENAMED)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    weights = {"old_proj.weight": torch.randn(16, 16), "old_proj.bias": torch.randn(16)}
    save_file(weights, str(folder / "model.safetensors"))
    assert main(["encode", str(folder), "-o", "r.sws", "--prune", "0.5", "--clusters", "8", "--module",
                 "renamed.py:Net"]) == 0
    assert "holds older names of the model's tensors" in capsys.readouterr().err
    loaded = swsformat.load_model("r.sws", ns["Net"]())
    assert torch.equal(loaded.proj.bias, weights["old_proj.bias"])
    assert loaded.proj.weight.unique().numel() <= 9


def test_cli_refuses_clusters_0_and_a_decode_name_it_cannot_write(tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save({"fc.weight": torch.randn(8, 8)}, src)
    assert main(["encode", str(src), "-o", str(tmp_path / "m.sws"), "--clusters", "0"]) == 2
    assert "--clusters must be in [1, 255]" in capsys.readouterr().err
    assert main(["encode", str(src), "-o", str(tmp_path / "m.sws"), "--clusters", "4"]) == 0
    for name in ("x.npz", "x.json", "x"):
        assert main(["decode", str(tmp_path / "m.sws"), "-o", str(tmp_path / name)]) == 2
        assert "name the output .pt, .pth, .bin (a torch.save file) or .safetensors" in capsys.readouterr().err
        assert not (tmp_path / name).exists()


def test_info_columns_stay_apart_for_long_names(tmp_path, capsys):
    long = "encoder.layers.0.attention.self_attn.out_proj.weight"
    swsformat.encode({long: torch.tensor([[0.0, 0.5, -0.5, 0.5]] * 4)}, tmp_path / "l.sws")
    capsys.readouterr()
    assert main(["info", str(tmp_path / "l.sws")]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(long))
    assert row.split()[:3] == [long, "4x4", "ctx"]


TIED = '''
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(40, 16)
        self.head = nn.Linear(16, 40, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.emb(x))
'''


def test_a_forward_that_fails_on_the_data_leaves_no_file(small_mnist, tmp_path, monkeypatch, capsys):
    from swsformat.retrain import data as data_mod

    monkeypatch.setenv(data_mod.ENV_VAR, os.path.abspath(os.environ[data_mod.ENV_VAR]))
    monkeypatch.chdir(tmp_path)
    ns = user_module(tmp_path, "tied.py", TIED)
    torch.save(ns["Net"]().state_dict(), "tied.pt")
    assert main(["encode", "tied.pt", "-o", "t.sws", "--prune", "0.5", "--clusters", "8", "--module", "tied.py:Net",
                 "--data", "mnist"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "forward failed on --data mnist" in err[0]
    assert not (tmp_path / "t.sws").exists()


def test_inputs_that_are_no_model_or_would_be_overwritten(tmp_path, capsys):
    """An output among an input folder's files, an empty checkpoint, a .sws given as input and
    a file named for the other format: each one line, no output written."""
    from safetensors.torch import save_file

    folder = tmp_path / "hf"
    folder.mkdir()
    save_file({"fc.weight": torch.randn(4, 4)}, str(folder / "model.safetensors"))
    before = (folder / "model.safetensors").read_bytes()
    assert main(["encode", str(folder), "-o", str(folder / "model.safetensors"), "--clusters", "4"]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert (folder / "model.safetensors").read_bytes() == before
    assert main(["encode", str(folder), "-o", str(folder / "model.sws"), "--clusters", "4"]) == 0  # a new file is fine
    capsys.readouterr()
    torch.save({}, tmp_path / "empty.pt")
    torch.save({"state_dict": {}, "model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "ckpt.pt")
    (tmp_path / "pt.safetensors").write_bytes((tmp_path / "ckpt.pt").read_bytes())
    for name, message in (("empty.pt", "holds no tensors"), ("hf/model.sws", "is already a .sws file"),
                          ("pt.safetensors", "its bytes are a PyTorch (zip) checkpoint")):
        assert main(["encode", str(tmp_path / name), "-o", str(tmp_path / "out.sws")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
        assert not (tmp_path / "out.sws").exists()
    assert main(["encode", str(tmp_path / "ckpt.pt"), "-o", str(tmp_path / "out.sws")]) == 0  # the non-empty model
    assert set(swsformat.load_state_dict(tmp_path / "out.sws")) == {"fc.weight"}
