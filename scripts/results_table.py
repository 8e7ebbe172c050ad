"""Print the README's results table from the committed JSON files under results/paper/ and
the rates of the .sws files beside them (as ``size_report`` counts today).

    python scripts/results_table.py
"""

from __future__ import annotations

import json
from pathlib import Path

import swsformat

ROOT = Path(__file__).resolve().parent.parent
PAPER = {
    "lenet300-100": ("LeNet-300-100", 1.94, 4.3, 64),
    "lenet5-caffe": ("LeNet-5-Caffe", 0.97, 0.5, 162),
    "tutorial-net": ("tutorial conv net (642K)", 0.98, 7.43, None),
}


def main() -> None:
    print("| model | paper: error % / non-zero % / CR | pretrained error % | retrained error % | snapped error % after QAT | quantized error % (decoded file) | non-zero % | components | file bytes | CR whole file | CR paper accounting | retrain epochs | wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sorted((ROOT / "results" / "paper").glob("*.json")):
        r = json.loads(path.read_text())
        rep = swsformat.size_report(path.with_suffix(".sws"), entropy=False)
        label, err, nz, cr = PAPER[r["model"]]
        label = f"{label} (`{path.stem}.sws`)"
        paper = f"{err} / {nz} / {cr if cr else 'n/a'}"
        qat = r.get("config", {}).get("qat_epochs", 0)
        snapped = f"{r['snapped_error']:.2f} ({qat} epochs)" if "snapped_error" in r else "n/a (no QAT)"
        print(
            f"| {label} | {paper} | {r['pretrained_error']:.2f} | {r['retrained_error']:.2f} | {snapped} | "
            f"{r['quantized_error']:.2f} ({r['decoded_test_error']:.2f}) | {100 * r['nonzero_fraction']:.2f} | "
            f"{r['components_left']} | {rep['file_bytes']:,} | {rep['compression_rate']:.0f} | "
            f"{rep['paper_compression_rate']:.0f} | {len(r['retrain_test_error_per_epoch'])} | {r['wall_seconds'] / 60:.0f} min |"
        )


if __name__ == "__main__":
    main()
