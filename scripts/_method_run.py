"""What the scripts of the other methods share: the pretrained net of ``sws compress --model
M``, one run of the method, its ``.sws`` file under ``results/methods/`` and a JSON beside it
with the command, config, results and provenance."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from swsformat import size_report
from swsformat.provenance import provenance
from swsformat.retrain import data
from swsformat.retrain.reproduce import BEST, pretrained_model
from swsformat.retrain.train import pick_device

ROOT = Path(__file__).resolve().parent.parent


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", default="lenet300-100", choices=sorted(BEST))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "results" / "methods"))
    p.add_argument("--stem", default=None, help="the file's name after the model's (default: the method's)")
    return p


def run(script: str, stem: str, a: argparse.Namespace, config: Any, method: Callable, argv: list[str] | None) -> None:
    """``method(model, train, test, config, path=..., metadata=...)`` on the pretrained ``a.model``
    (of seed ``a.seed``, as ``sws compress --seed``); seeds other than 0 add ``-sSEED`` to the file's name."""
    origin = provenance(ROOT)
    t0 = time.perf_counter()
    best = BEST[a.model]
    norm = best.get("normalization", "unit")
    train, test = data.load("mnist", normalization=norm)
    model, _, cached = pretrained_model(a.model, "mnist", train, test, best["pretrain_epochs"], a.seed, pick_device(),
                                        True, norm)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = a.stem or stem
    path = out / f"{a.model}-{stem}{f'-s{a.seed}' if a.seed else ''}.sws"  # seed 0 keeps the plain name
    result = method(model, train, test, config, path=path,
                    metadata={"sws.input": json.dumps(data.input_spec("mnist", norm))})
    rep = size_report(path)
    record = {
        "command": " ".join(["python", f"scripts/{script}", *(argv if argv is not None else sys.argv[1:])]),
        "model": a.model,
        "config": asdict(config),
        "pretrain_from_cache": cached,
        **result.summary(),
        "file_bytes": rep["file_bytes"],
        "compression_rate": rep["compression_rate"],
        "paper_compression_rate": rep["paper_compression_rate"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "provenance": origin,
    }
    path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("pretrained_error", "quantized_error", "nonzero_fraction", "file_bytes",
                                              "compression_rate")}))
