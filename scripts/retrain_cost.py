"""Whole-run cost of the prior: every epoch of a real retraining against a plain epoch.

The benchmark (benchmarks/bench_retrain.py) times one epoch in two synthetic mixture states;
this script times all epochs of the retraining ``sws compress`` runs, on MNIST, with the
model's best settings (``BEST``) and its cached pretrained net. Before each retraining epoch
it times one plain Adam epoch of a copy of the pretrained net, so both see the same machine
state, and it writes the per-epoch ratios and the whole-run ratio as JSON:

    python scripts/retrain_cost.py --model lenet300-100 -o results/retrain_cost/lenet300-100.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from swsformat import __version__
from swsformat.encoder import atomic_write
from swsformat.retrain import data as data_mod
from swsformat.retrain.pipeline import CompressConfig
from swsformat.retrain.prior import PriorConfig
from swsformat.retrain.reproduce import BEST, apply_overrides, machine, pretrained_model
from swsformat.retrain.train import RetrainConfig, adam, default_prior, evaluate, make_optimizer, train_epoch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lenet300-100", choices=sorted(BEST))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args(argv)

    best = BEST[args.model]
    normalization = best.get("normalization", "unit")
    train, test = data_mod.load("mnist", root=args.data_root, normalization=normalization)
    device = torch.device("cpu")
    model, _, _ = pretrained_model(args.model, "mnist", train, test, best["pretrain_epochs"], args.seed, device, True, normalization)
    config = apply_overrides(
        CompressConfig(prior=PriorConfig(), retrain=RetrainConfig(epochs=best["epochs"], tau=best["tau"]), seed=args.seed),
        best.get("overrides", {}),
    )
    cfg = config.retrain
    plain_model = copy.deepcopy(model)
    plain_opt = adam(plain_model.parameters(), lr=cfg.lr_weights)
    prior = default_prior(model, config.prior)
    opt = make_optimizer(model, prior, cfg)
    gen, plain_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    rows = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_epoch(plain_model, plain_opt, train, cfg.batch_size, plain_gen, progress=False)
        t1 = time.perf_counter()
        train_epoch(model, opt, train, cfg.batch_size, gen, prior, cfg.tau_at(epoch) / len(train), progress=False)
        t2 = time.perf_counter()
        grouped, seen = prior.grouping
        row = {
            "epoch": epoch, "plain_s": round(t1 - t0, 3), "retrain_s": round(t2 - t1, 3),
            "ratio": round((t2 - t1) / (t1 - t0), 3), "grouped_tensors": f"{grouped}/{seen}",
            "test_error": round(evaluate(model, test), 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    plain_total = sum(r["plain_s"] for r in rows)
    retrain_total = sum(r["retrain_s"] for r in rows)
    out = {
        "command": " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        "model": args.model,
        "seed": args.seed,
        "machine": machine(),
        "library": __version__,
        "epochs": rows,
        "plain_total_s": round(plain_total, 2),
        "retrain_total_s": round(retrain_total, 2),
        "whole_run_ratio": round(retrain_total / plain_total, 3),
        "note": "ratio = retraining epoch / plain epoch (same sample count, batch size and Adam); "
        "grouped_tensors: weight tensors whose prior kernel ran in value-grouped order at the epoch's end",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, (json.dumps(out, indent=1) + "\n").encode())  # no half-written JSON
    print(f"whole run: retraining {retrain_total:.1f} s vs plain {plain_total:.1f} s, ratio {out['whole_run_ratio']}")


if __name__ == "__main__":
    main()
