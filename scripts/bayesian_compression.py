"""Bayesian Compression (group normal-Jeffreys or horseshoe) of a built-in MNIST net, beside soft weight-sharing.

Starts from the same pretrained net as ``sws compress --model M`` (the pretrained-net
cache, or pretrains it with the same recipe), runs :func:`bayesian_compress` and writes
``results/methods/M-bayesian-compression[-horseshoe].sws`` and its JSON (with provenance).

    python scripts/bayesian_compression.py --model lenet300-100
"""

from __future__ import annotations

from _method_run import parser, run

from swsformat.retrain.bayesian import BayesianCompressionConfig, bayesian_compress


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--prior", choices=("jeffreys", "horseshoe"), default=BayesianCompressionConfig.prior,
                   help="group normal-Jeffreys (BC-GNJ) or group horseshoe (BC-GHS)")
    p.add_argument("--tau0", type=float, default=BayesianCompressionConfig.tau0, help="the horseshoe's global scale")
    p.add_argument("--epochs", type=int, default=BayesianCompressionConfig.epochs)
    p.add_argument("--threshold", type=float, default=BayesianCompressionConfig.threshold)
    p.add_argument("--lr-logvar", type=float, default=BayesianCompressionConfig.lr_logvar,
                   help="learning rate of the log-scale parameters (how fast the noise grows)")
    p.add_argument("--finetune-epochs", type=int, default=BayesianCompressionConfig.finetune_epochs)
    p.add_argument("--rounding-tolerance", type=float, default=BayesianCompressionConfig.rounding_tolerance,
                   help="error points the rounding may cost on training data (negative: the paper's grids only)")
    a = p.parse_args(argv)
    tolerance = None if a.rounding_tolerance < 0 else a.rounding_tolerance
    config = BayesianCompressionConfig(prior=a.prior, tau0=a.tau0, epochs=a.epochs, threshold=a.threshold,
                                       lr_logvar=a.lr_logvar,
                                       finetune_epochs=a.finetune_epochs, rounding_tolerance=tolerance, seed=a.seed)
    stem = "bayesian-compression" + ("-horseshoe" if a.prior == "horseshoe" else "")
    run("bayesian_compression.py", stem, a, config, bayesian_compress, argv)


if __name__ == "__main__":
    main()
