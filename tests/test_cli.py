"""The ``sws`` command, called as ``main(argv)`` and as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import swsformat
from swsformat.cli import main
from swsformat.retrain.models import build_model

from .conftest import DATA


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
    assert "compression rate" in capsys.readouterr().out
    assert main(["info", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert 0.09 < rep["nonzero_fraction"] < 0.11
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
    assert res["load"]["sws_dense_s"] > 0
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
