"""One comparison of the methods' committed files on the MNIST nets: error against size.

Reads every ``results/paper/M.sws`` (soft weight-sharing, ``sws compress``) and
``results/methods/M-METHOD.sws`` (Deep Compression, Bayesian Compression, ...) with the JSON
beside it, and reports for each file three accountings of the same weights:

* **whole file**: the float32 weights' bytes over the ``.sws`` file's bytes (everything a
  user ships: header, codebooks, indices, biases);
* **SWS paper** (weights only): the soft weight-sharing paper's count, CSR with relative
  indices and a codebook per layer (``size_report``'s ``paper_compression_rate``);
* **BC paper** (weights only): the Bayesian Compression paper's count after precision
  reduction, every non-zero weight at its layer's ``ceil(log2(values + 1))`` bits and no
  positions (structured pruning needs none; for unstructured sparsity it flatters).

It writes ``results/comparison.json`` and ``results/comparison.md`` and plots error against
whole-file rate per net, with the published anchors, to ``results/comparison.png``.
Errors are the JSONs' (``tests/test_results.py`` decodes every file and checks them).

    python scripts/compare_methods.py
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np

import swsformat

ROOT = Path(__file__).resolve().parent.parent
# Published LeNet numbers (the seeds' tables and the issue's anchors): (label, error %, rate,
# accounting).
ANCHORS = {
    "lenet5-caffe": [
        ("SWS paper", 0.97, 162, "SWS paper"),
        ("Deep Compression", 0.74, 39, "weights only"),
        ("BC-GNJ", 1.0, 361, "BC paper"),
        ("BC-GHS", 1.0, 419, "BC paper"),
        ("EPR", 1.0, 606, "real bits"),
        ("MIRACLE", 0.96, 1110, "real bits"),
    ],
    "lenet300-100": [
        ("SWS paper", 1.94, 64, "SWS paper"),
        ("Deep Compression", 1.58, 40, "weights only"),
    ],
}


def precision_bits(state: dict[str, np.ndarray]) -> tuple[int, int]:
    """(float32 bits of the weight matrices, bits of their non-zero weights at each layer's
    precision, ``ceil(log2(values + 1))``, no positions): the Bayesian Compression paper's
    "after precision reduction" count."""
    full = kept = 0
    for w in state.values():
        full += 32 * w.size
        nz = w[w != 0]
        if nz.size:
            kept += nz.size * max(1, math.ceil(math.log2(np.unique(nz).size + 1)))
    return full, kept


def method_name(metadata: dict[str, str]) -> str:
    """The method a file records in its ``sws.method`` metadata; ``sws compress`` files record none."""
    return json.loads(metadata["sws.method"])["method"] if "sws.method" in metadata else "soft-weight-sharing"


def entry(sws: Path) -> dict:
    record = json.loads(sws.with_suffix(".json").read_text())
    f = swsformat.open(sws)
    method = method_name(f.metadata())
    tau = record.get("config", {}).get("retrain", {}).get("tau")
    if method == "soft-weight-sharing" and tau is not None:
        method += f" tau {tau:g}"  # several settings of the same method side by side
    schedule = record.get("config", {}).get("prune_schedule")
    if method == "deep-compression" and schedule:
        method += f" {100 * schedule[-1]:g}% pruned"  # the paper's 92% beside the default 96%
    if method in ("bayesian-compression", "bc-retrained"):
        prior = json.loads(f.metadata()["sws.method"]).get("prior", "")
        method += " GHS" if "horseshoe" in prior else " GNJ"
        config = record.get("config", {})
        if method.startswith("bc-retrained") and config.get("clusters", 16) != 16:
            method += f" {config['clusters']} values"  # settings side by side, not seeds of one
        if method.startswith("bc-retrained") and config.get("prune_within"):
            method += f" {100 * config['prune_within']:g}% pruned within"
    weights = {n: t.numpy() for n, t in swsformat.load_state_dict(sws).items() if n.endswith("weight") and t.dim() > 1}
    full, kept = precision_bits(weights)
    rep = swsformat.size_report(sws)
    error = record.get("decoded_test_error", record.get("quantized_error"))
    return {
        "file": str(sws.relative_to(ROOT)),
        "model": record["model"],
        "method": method,
        "seed": record.get("config", {}).get("seed", record.get("seed", 0)),
        "test_error": error,
        "pretrained_error": record.get("pretrained_error"),
        "nonzero_fraction": rep["nonzero_fraction"],
        "file_bytes": rep["file_bytes"],
        "rate_whole_file": rep["compression_rate"],
        "rate_sws_paper": rep["paper_compression_rate"],
        "rate_bc_paper": full / kept if kept else None,
        "command": record.get("command"),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "results" / "comparison"), help="stem of the .json/.md/.png outputs")
    a = p.parse_args(argv)
    files = sorted((ROOT / "results" / "paper").glob("*.sws")) + sorted((ROOT / "results" / "methods").glob("*.sws"))
    rows = [entry(f) for f in files]
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"files": rows, "anchors": ANCHORS}, indent=2) + "\n")
    lines = [
        "| net | method | seed | test error % | non-zero % | file bytes | whole file | SWS paper | BC paper |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["model"], -r["rate_whole_file"])):
        bc = f"{r['rate_bc_paper']:.0f}" if r["rate_bc_paper"] else "n/a"
        lines.append(f"| {r['model']} | {r['method']} | {r['seed']} | {r['test_error']:.2f} | "
                     f"{100 * r['nonzero_fraction']:.2f} | {r['file_bytes']:,} | {r['rate_whole_file']:.0f} | "
                     f"{r['rate_sws_paper']:.0f} | {bc} |")
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["method"]), []).append(r)
    several = {k: g for k, g in sorted(groups.items()) if len(g) > 1}
    if several:
        lines += ["", "Settings run with several seeds: mean (min-max).", "",
                  "| net | method | seeds | test error % | whole file |", "|---|---|---|---|---|"]
        for (model, method), g in several.items():
            err = [r["test_error"] for r in g]
            rate = [r["rate_whole_file"] for r in g]
            lines.append(f"| {model} | {method} | {', '.join(str(r['seed']) for r in sorted(g, key=lambda r: r['seed']))} | "
                         f"{np.mean(err):.2f} ({min(err):.2f}-{max(err):.2f}) | "
                         f"{np.mean(rate):.0f} ({min(rate):.0f}-{max(rate):.0f}) |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        colours: dict[str, object] = {}  # one colour and legend entry per method, seeds alike
        for r in (r for r in rows if r["model"] == model):
            first = r["method"] not in colours
            dot = ax.scatter(r["rate_whole_file"], r["test_error"], s=40, color=colours.get(r["method"]),
                             label=f"{r['method']} (whole file)" if first else None)
            colours.setdefault(r["method"], dot.get_facecolor())
            if r["rate_bc_paper"]:
                ax.scatter(r["rate_bc_paper"], r["test_error"], s=40, marker="s", facecolors="none",
                           edgecolors=dot.get_facecolor())
        for k, (label, err, rate, how) in enumerate(ANCHORS.get(model, [])):
            ax.scatter(rate, err, marker="x", color="black")
            ax.annotate(f"{label} ({how})", (rate, err), fontsize=7, xytext=(3, 3 - 9 * (k % 3)),
                        textcoords="offset points")
        ax.set_xscale("log")
        ax.set_xlabel("compression rate (float32 bytes / compressed)")
        ax.set_ylabel("test error %")
        ax.set_title(f"{model}: files here (dots; squares: same file, BC-paper count) and published (x)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
