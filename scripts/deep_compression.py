"""Deep Compression with retraining on a built-in MNIST net, beside soft weight-sharing.

Starts from the same pretrained net as ``sws compress --model M`` (the pretrained-net
cache, or pretrains it with the same recipe), runs :func:`deep_compress` and writes
``results/methods/M-deep-compression.sws`` and its JSON (with provenance).

    python scripts/deep_compression.py --model lenet300-100
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from swsformat import size_report
from swsformat.provenance import provenance
from swsformat.retrain import data
from swsformat.retrain.deep_compression import DeepCompressionConfig, deep_compress
from swsformat.retrain.reproduce import BEST, pretrained_model
from swsformat.retrain.train import pick_device

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="lenet300-100", choices=sorted(BEST))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retrain-epochs", type=int, default=DeepCompressionConfig.retrain_epochs)
    p.add_argument("--schedule", type=float, nargs="+", default=list(DeepCompressionConfig.prune_schedule))
    p.add_argument("--clusters", type=int, default=DeepCompressionConfig.clusters)
    p.add_argument("--out", default=str(ROOT / "results" / "methods"))
    a = p.parse_args(argv)
    origin = provenance(ROOT)
    t0 = time.perf_counter()
    best = BEST[a.model]
    norm = best.get("normalization", "unit")
    device = pick_device()
    train, test = data.load("mnist", normalization=norm)
    model, _, cached = pretrained_model(a.model, "mnist", train, test, best["pretrain_epochs"], a.seed, device,
                                        True, norm)
    config = DeepCompressionConfig(prune_schedule=tuple(a.schedule), retrain_epochs=a.retrain_epochs,
                                   clusters=a.clusters, seed=a.seed)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.model}-deep-compression.sws"
    result = deep_compress(model, train, test, config, path=path,
                           metadata={"sws.input": json.dumps(data.input_spec("mnist", norm))})
    rep = size_report(path)
    record = {
        "command": " ".join(["python", "scripts/deep_compression.py", *(argv if argv is not None else sys.argv[1:])]),
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


if __name__ == "__main__":
    main()
