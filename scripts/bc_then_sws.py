"""Bayesian Compression's structure, then soft weight-sharing's quantization, on a built-in MNIST net.

The combination the seeds suggest: group normal-Jeffreys (or horseshoe) training prunes whole
input units and filters (:func:`train_bayesian`, then ``finalize_(round_values=False)``:
pruned groups zeroed, the kept ones at their posterior means), and soft weight-sharing
retrains what is left under its mixture prior, snaps it to the mixture's means and writes the
file (:func:`compress` with the config ``sws compress --model M`` uses). Starts from the same
pretrained net as both; writes ``results/methods/M-bc-then-sws.sws`` and its JSON.

    python scripts/bc_then_sws.py --model lenet300-100
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import torch
from _method_run import parser, run
from torch import nn

from swsformat.retrain.bayesian import BayesianCompressionConfig, train_bayesian
from swsformat.retrain.pipeline import compress
from swsformat.retrain.reproduce import best_config
from swsformat.retrain.train import evaluate


@dataclass
class Combined:
    bayesian: BayesianCompressionConfig
    sws: Any  # CompressConfig
    restart: bool = False  # soft weight-sharing from the pretrained weights of the kept groups


@dataclass
class CombinedResult:
    bayesian_epochs: list[dict[str, Any]]
    groups_kept: dict[str, tuple[int, int]]
    structured_error: float
    sws: dict[str, Any]

    def summary(self) -> dict[str, Any]:
        return {**self.sws, "bayesian_epochs": self.bayesian_epochs, "groups_kept": self.groups_kept,
                "structured_error": self.structured_error}


def combined(model: nn.Module, train, test, config: Combined, path, metadata) -> CombinedResult:
    measure = lambda m: evaluate(m, test)  # noqa: E731
    pretrained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    bc, epochs = train_bayesian(model, train, config.bayesian, measure)
    shapes = {n: layer._group_shape() for n, layer in bc.layers.items()}
    keep = {n: la < config.bayesian.threshold for n, la in bc.log_alphas().items()}
    done = bc.finalize_(round_values=False)
    if config.restart:  # the structure alone: the pretrained weights of the kept groups
        with torch.no_grad():
            for n, k in keep.items():
                layer = model.get_submodule(n)
                layer.weight.copy_(pretrained[f"{n}.weight"] * k.view(shapes[n]).expand_as(layer.weight) + 0.0)
                if layer.bias is not None and isinstance(layer, nn.Conv2d):  # a pruned filter's output is gone
                    layer.bias.copy_(pretrained[f"{n}.bias"] * k + 0.0)
                elif layer.bias is not None:
                    layer.bias.copy_(pretrained[f"{n}.bias"])
    structured = measure(model)
    print(f"structure {done.groups_kept}: {structured:.2f}% error before soft weight-sharing")
    method = {"method": "bc-then-sws", "bayesian": asdict(config.bayesian), "restart": config.restart}
    result = compress(model, train, test, config.sws, path=path, metadata={"sws.method": json.dumps(method), **metadata})
    return CombinedResult(epochs, done.groups_kept, structured, result.summary())


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prior", choices=("jeffreys", "horseshoe"), default="jeffreys")
    p.add_argument("--bc-epochs", type=int, default=BayesianCompressionConfig.epochs)
    p.add_argument("--threshold", type=float, default=BayesianCompressionConfig.threshold)
    p.add_argument("--lr-logvar", type=float, default=BayesianCompressionConfig.lr_logvar)
    p.add_argument("--tau", type=float, default=None, help="soft weight-sharing's tau (default: the model's)")
    p.add_argument("--restart", action="store_true",
                   help="keep only the structure: soft weight-sharing starts from the pretrained weights of the kept groups")
    a = p.parse_args(argv)
    bc = BayesianCompressionConfig(prior=a.prior, epochs=a.bc_epochs, threshold=a.threshold, lr_logvar=a.lr_logvar,
                                   seed=a.seed)
    config = Combined(bc, best_config(a.model, seed=a.seed, tau=a.tau), a.restart)
    run("bc_then_sws.py", "bc-then-sws", a, config, combined, argv)


if __name__ == "__main__":
    main()
