"""Whole-run cost of the prior: every epoch of a real retraining against a plain epoch.

The benchmark (benchmarks/bench_retrain.py) times one epoch in two synthetic mixture states;
this script times all epochs of the retraining ``sws compress`` runs, on MNIST, with the
model's best settings (``BEST``) and its cached pretrained net. Before each retraining epoch
it times one plain Adam epoch of a copy of the pretrained net, so both see the same machine
state, and it writes the per-epoch ratios and the whole-run ratio as JSON. One-time costs
are paid before the timing (as in the benchmark) and reported apart: the first prior call of
a process loads numba's cached kernels and starts its threads (about 0.5 s, once per run):

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
import torch.nn.functional as F

from swsformat.files import atomic_write
from swsformat.provenance import provenance
from swsformat.retrain import data as data_mod
from swsformat.retrain.models import compressible_parameters
from swsformat.retrain.reproduce import BEST, best_config, pretrained_model
from swsformat.retrain.train import (
    PriorGradient,
    SplitBatches,
    adam,
    default_prior,
    evaluate,
    make_optimizer,
    train_epoch,
)


def warm_up(model, optimizer, train, batch_size: int, prior=None) -> float:
    """One forward/backward (and prior call) that leaves the training state as it was:
    no optimizer step, gradients dropped. Returns its seconds."""
    t0 = time.perf_counter()
    x, y = train.x[:batch_size], train.y[:batch_size]
    F.cross_entropy(model(x), y).backward()
    if prior is not None:
        prior.add_complexity_grad_([p for _, p in compressible_parameters(model)], 1.0 / len(train))
        prior.reset_grouping()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


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
    config = best_config(args.model, args.seed)
    cfg = config.retrain
    plain_model = copy.deepcopy(model)
    plain_opt = adam(plain_model.parameters(), lr=cfg.lr_weights)
    prior = default_prior(model, config.prior)
    opt = make_optimizer(model, prior, cfg)
    hook = PriorGradient(prior, [p for _, p in compressible_parameters(model)])
    gen, plain_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(args.seed + 1)
    warm_plain = warm_up(plain_model, plain_opt, train, cfg.batch_size)
    warm_retrain = warm_up(model, opt, train, cfg.batch_size, prior)
    rows = []
    for epoch in range(1, cfg.epochs + 1):
        t0 = time.perf_counter()
        train_epoch(plain_model, plain_opt, SplitBatches(train, cfg.batch_size, plain_gen), progress=False)
        t1 = time.perf_counter()
        hook.new_epoch(cfg.tau_at(epoch) / len(train))
        train_epoch(model, opt, SplitBatches(train, cfg.batch_size, gen), after_backward=hook, progress=False)
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
        "provenance": provenance(),
        "epochs": rows,
        "plain_total_s": round(plain_total, 2),
        "retrain_total_s": round(retrain_total, 2),
        "whole_run_ratio": round(retrain_total / plain_total, 3),
        "warm_up_s": {"plain": round(warm_plain, 3), "retrain": round(warm_retrain, 3)},
        "note": "ratio = retraining epoch / plain epoch (same sample count, batch size and Adam); "
        "grouped_tensors: weight tensors whose prior kernel ran in value-grouped order at the epoch's end; "
        "warm_up_s: one batch before the timing, once per run (the retraining one loads numba's cached kernels)",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.output, (json.dumps(out, indent=1) + "\n").encode())  # no half-written JSON
    print(f"whole run: retraining {retrain_total:.1f} s vs plain {plain_total:.1f} s, ratio {out['whole_run_ratio']}")


if __name__ == "__main__":
    main()
