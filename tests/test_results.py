"""The committed results/paper files, decoded and evaluated independently on the MNIST test set."""

from __future__ import annotations

import json
import sys

import pytest

import swsformat
from swsformat.retrain import data, evaluate

from .conftest import ROOT

PAPER = ROOT / "results" / "paper"


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted(PAPER.glob("*.sws")), ids=lambda p: p.stem)
def test_committed_file_matches_its_json(path, mnist):
    record = json.loads(path.with_suffix(".json").read_text())
    meta = swsformat.read_header(path)["metadata"]
    norm = json.loads(meta["sws.input"])["normalization"] if "sws.input" in meta else "standard"
    _, test = data.load("mnist", download=False, normalization=norm)
    model = swsformat.load_model(path)
    assert evaluate(model, test) == pytest.approx(record["decoded_test_error"])
    sparse = swsformat.load_model(path, sparse=True)
    assert abs(evaluate(sparse, test) - record["decoded_test_error"]) <= 0.02  # float summation order only
    rep = swsformat.size_report(path)
    assert rep["file_bytes"] == path.stat().st_size == record["file_bytes"]
    assert rep["compression_rate"] == pytest.approx(record["compression_rate"])
    assert rep["nonzero_fraction"] == pytest.approx(record["nonzero_fraction"])


# The targets, checked on the committed files (error %, minimum whole-file rate, maximum non-zero %).
TARGETS = {
    "lenet300-100": (1.94, 64, None),
    "lenet5-caffe": (1.0, 162, None),
    "tutorial-net": (1.0, None, 7.5),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_committed_file_meets_its_target(name, mnist):
    path = PAPER / f"{name}.sws"
    max_error, min_rate, max_nonzero = TARGETS[name]
    meta = swsformat.read_header(path)["metadata"]
    _, test = data.load("mnist", download=False, normalization=json.loads(meta["sws.input"])["normalization"])
    assert evaluate(swsformat.load_model(path), test) <= max_error
    rep = swsformat.size_report(path)
    if min_rate is not None:
        assert rep["compression_rate"] >= min_rate
    if max_nonzero is not None:
        assert 100 * rep["nonzero_fraction"] <= max_nonzero


@pytest.mark.parametrize("path", sorted(PAPER.glob("*.json")), ids=lambda p: p.stem)
def test_committed_json_config_is_what_its_command_runs_today(path):
    """Each committed file's command (no --set: every setting comes from ``BEST``) still builds
    the config recorded beside it, so re-running it reproduces the file; a changed default
    or a mistyped override key fails here, not after a 25-minute run."""
    from swsformat.retrain.pipeline import ADDED_LATER, settings_entry
    from swsformat.retrain.reproduce import BEST, best_config

    record = json.loads(path.read_text())
    assert not any(flag in record["command"] for flag in ("--set", "--tau", "--epochs"))
    best = BEST[record["model"]]
    config = best_config(record["model"], record["seed"])
    today = json.loads(json.dumps(config.to_dict()))  # tuples as JSON lists
    # Settings added after the file was made are allowed only at defaults that do what it did.
    for key, value in ADDED_LATER.items():
        recorded, leaf = settings_entry(record["config"], key)
        if leaf not in recorded:
            now, _ = settings_entry(today, key)
            assert now.pop(leaf) == value
    assert today == record["config"]
    assert record["pretrain_epochs"] == best["pretrain_epochs"]
    assert record["normalization"] == best.get("normalization", "unit")


@pytest.mark.slow
@pytest.mark.parametrize("path", sorted((ROOT / "results" / "methods").glob("*.sws")), ids=lambda p: p.stem)
def test_other_methods_files_match_their_json(path, mnist):
    """Files of the other methods (and other soft weight-sharing settings) decode to the error their JSON records."""
    record = json.loads(path.with_suffix(".json").read_text())
    f = swsformat.open(path)
    _, test = data.load("mnist", download=False, normalization=f.input_spec()["normalization"])
    assert evaluate(swsformat.load_model(path), test) == pytest.approx(record["quantized_error"])
    assert path.stat().st_size == record["file_bytes"]
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from compare_methods import method_name
    finally:
        sys.path.pop(0)
    assert method_name(f.metadata()) in path.stem


def test_comparison_covers_every_committed_file_and_counts_bits(tmp_path):
    """scripts/compare_methods.py: a row per committed file in all three accountings, and the
    BC paper's count (non-zero weights at each layer's precision) on a hand-made state."""
    import subprocess
    import sys

    import numpy as np

    out = tmp_path / "cmp"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "compare_methods.py"), "--out", str(out)], check=True,
                   capture_output=True)
    rows = json.loads(out.with_suffix(".json").read_text())["files"]
    files = sorted(PAPER.glob("*.sws")) + sorted((ROOT / "results" / "methods").glob("*.sws"))
    assert sorted(r["file"] for r in rows) == sorted(str(f.relative_to(ROOT)) for f in files)
    for r in rows:
        # the whole file holds more than the SWS paper's count of the same weights (the BC paper's
        # count, fixed bits per non-zero, can be beaten: entropy-coded values, cheap dead-unit positions)
        assert r["rate_whole_file"] < r["rate_sws_paper"]
    assert out.with_suffix(".png").stat().st_size > 0
    seeds = {(r["model"], r["method"], r["seed"]) for r in rows}
    if len(seeds) > len({s[:2] for s in seeds}):  # a setting with several seeds gets its mean and spread
        assert "Settings run with several seeds" in out.with_suffix(".md").read_text()
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from compare_methods import precision_bits
    finally:
        sys.path.pop(0)
    w = np.zeros((4, 10))
    w[0, :3] = [0.5, -0.5, 0.25]  # 3 values: 2 bits each
    assert precision_bits({"a": w, "b": np.zeros((2, 2))}) == (32 * 44, 3 * 2)


@pytest.mark.parametrize("folder, stem, summary, factory", [
    ("text-gpt", "byte-gpt", "summary", "ByteGPT"),
    ("fashion-resnet", "resnet", "summary", "ResNet"),
    ("fashion-resnet", "resnet-distill", "summary-distill", "ResNet"),
])
def test_beyond_mnist_files_load_into_their_scripts_models(folder, stem, summary, factory):
    """The committed files of the scripts beyond MNIST decode into the scripts' own modules with
    the sizes and non-zero shares their summaries record (their metrics need the scripts' data:
    the Python sources of the Python that ran them, Fashion-MNIST)."""
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        module = __import__({"ByteGPT": "text_gpt", "ResNet": "fashion_resnet"}[factory])
    finally:
        sys.path.pop(0)
    path = ROOT / "results" / folder / f"{stem}.sws"
    summary = json.loads((path.parent / f"{summary}.json").read_text())
    assert path.stat().st_size == summary["file_bytes"]
    kwargs = {"norm": False} if factory == "ResNet" else {"layers": 3}
    model = swsformat.load_model(path, getattr(module, factory)(**kwargs))
    coded = [p for n, p in model.named_parameters() if p.dim() > 1]
    nonzero = sum(int(p.count_nonzero()) for p in coded) / sum(p.numel() for p in coded)
    assert nonzero == pytest.approx(summary["nonzero_fraction"], abs=1e-3)
    if factory == "ByteGPT":
        back = swsformat.load_state_dict(path)
        assert back["head.weight"] is back["tok.weight"] and summary["tied_stored_once"]
