"""What the prior adds to a training step of a model with >= 10M weights, at 1 and 2 threads.

Two models a user trains: a 4-block pre-norm transformer (width 512, 8 heads, 12.6M weights
under the prior) on 4 windows of 128 tokens, and a 784-4096-4096-4096-10 MLP (36.8M) on 256
images. A plain step (forward, backward, fused Adam) and the same step with
``SoftWeightSharing.add_complexity_grad_()`` (plus the prior's three Adam groups) alternate,
``--repeat`` of each, medians; in two mixture states: "fresh" (all components wide, as the
prior starts: every component reaches every weight) and "converged" (narrow components,
weights drawn from them, as from the fourth epoch of a real run). One process per thread count.

    python benchmarks/prior_cost.py --threads 1 2 --repeat 7 --json benchmarks/prior_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_retrain import converge_  # noqa: E402


class Transformer(nn.Module):
    def __init__(self, width: int = 512, layers: int = 4, vocab: int = 256, context: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(width, 8, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)
        self.mask = nn.Transformer.generate_square_subsequent_mask(context)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.head(self.blocks(h, mask=self.mask, is_causal=True))


def cases() -> dict[str, tuple]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (4, 129), generator=g)
    images = torch.randn(256, 784, generator=g)
    labels = torch.randint(0, 10, (256,), generator=g)
    mlp = lambda: nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),  # noqa: E731
                                nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    return {
        "transformer-12.6M": (Transformer, lambda m: F.cross_entropy(m(tokens[:, :-1]).reshape(-1, 256),
                                                                     tokens[:, 1:].reshape(-1)), 4 * 128),
        "mlp-36.8M": (mlp, lambda m: F.cross_entropy(m(images), labels), 256),
    }


def step(model: nn.Module, loss_of, opt: torch.optim.Optimizer, sws) -> tuple[float, float]:
    """One training step; returns its seconds and those of the prior's call (0 without ``sws``)."""
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=False)
    loss_of(model).backward()
    t1 = time.perf_counter()
    if sws is not None:
        sws.add_complexity_grad_()
    t2 = time.perf_counter()
    opt.step()
    return time.perf_counter() - t0, t2 - t1


def measure(repeat: int) -> list[dict]:
    import swsformat
    from swsformat.retrain import PriorConfig

    rows = []
    for name, (make, loss_of, batch) in cases().items():
        for state in ("fresh", "converged"):
            torch.manual_seed(0)
            model = make()
            sws = swsformat.SoftWeightSharing(model, PriorConfig(), dataset_size=60000, tau=0.05)
            if state == "converged":
                converge_(model, sws.prior)
            weights = sum(w.numel() for w in sws.weights)
            plain = torch.optim.Adam(model.parameters(), lr=1e-6, fused=True)
            both = torch.optim.Adam([{"params": model.parameters(), "lr": 1e-6},
                                     *sws.param_groups(1e-6, 1e-6, 1e-6)], fused=True)

            for opt in (plain, both, plain, both):  # first calls: kernels from numba's cache, allocations
                step(model, loss_of, opt, sws if opt is both else None)
            times: dict[str, list[float]] = {"plain": [], "with_prior": [], "prior_call": []}
            for _ in range(repeat):
                times["plain"].append(step(model, loss_of, plain, None)[0])
                total, prior = step(model, loss_of, both, sws)
                times["with_prior"].append(total)
                times["prior_call"].append(prior)
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({
                "model": name, "mixture": state, "weights_under_prior": weights, "batch": batch,
                "plain_step_s": med["plain"], "step_with_prior_s": med["with_prior"], "prior_call_s": med["prior_call"],
                "ratio": med["with_prior"] / med["plain"], "prior_ns_per_weight": 1e9 * med["prior_call"] / weights,
                "grouped_tensors": "{}/{}".format(*sws.prior.grouping),
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        print(json.dumps(measure(a.repeat)))
        return
    from swsformat.provenance import provenance

    results = {}
    for th in a.threads:
        env = {**os.environ, "OMP_NUM_THREADS": str(th), "NUMBA_NUM_THREADS": str(th)}
        out = subprocess.run([sys.executable, __file__, "--worker", "--repeat", str(a.repeat)], check=True, env=env,
                             capture_output=True, text=True).stdout
        results[th] = json.loads(out.strip().splitlines()[-1])
        for r in results[th]:
            print(f"{th} thread(s) {r['model']:>18} {r['mixture']:>9}: plain {r['plain_step_s']:.3f} s, "
                  f"with prior {r['step_with_prior_s']:.3f} s ({r['ratio']:.3f}x), "
                  f"prior {r['prior_ns_per_weight']:.2f} ns/weight")
    record = {"command": "python benchmarks/prior_cost.py " + " ".join(sys.argv[1:]), "provenance": provenance(ROOT),
              "gpu": "not measured: no GPU on this machine", "results": results}
    if a.json:
        a.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
