"""Deep Compression with retraining on a built-in MNIST net, beside soft weight-sharing.

Starts from the same pretrained net as ``sws compress --model M`` (the pretrained-net
cache, or pretrains it with the same recipe), runs :func:`deep_compress` and writes
``results/methods/M-deep-compression.sws`` and its JSON (with provenance).

    python scripts/deep_compression.py --model lenet300-100
"""

from __future__ import annotations

from _method_run import parser, run

from swsformat.retrain.deep_compression import DeepCompressionConfig, deep_compress


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--retrain-epochs", type=int, default=DeepCompressionConfig.retrain_epochs)
    p.add_argument("--schedule", type=float, nargs="+", default=list(DeepCompressionConfig.prune_schedule))
    p.add_argument("--clusters", type=int, default=DeepCompressionConfig.clusters)
    a = p.parse_args(argv)
    config = DeepCompressionConfig(prune_schedule=tuple(a.schedule), retrain_epochs=a.retrain_epochs,
                                   clusters=a.clusters, seed=a.seed)
    run("deep_compression.py", "deep-compression", a, config, deep_compress, argv)


if __name__ == "__main__":
    main()
