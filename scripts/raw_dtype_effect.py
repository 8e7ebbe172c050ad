"""What ``encode(..., raw_dtype=torch.float16)`` saves on the committed trained models, and what
it costs in their own metric.

Each committed file is decoded into its model and written again with the same coded weights,
the uncoded floating tensors (biases, norms, learned positions) kept as they are or stored in
float16 / bfloat16; every file is decoded again and measured on the full held-out or test
set. For reference, the best generic compressor (xz -9e, bzip2 -9, zstd -19) of the tensors'
own bytes (the decoded state_dict, concatenated). Results: ``results/raw-dtype/summary.json``.
The MNIST nets are left out: ``compress`` already stores their biases in float16
(``CompressConfig.bias_dtype``).

    python scripts/raw_dtype_effect.py
"""

from __future__ import annotations

import argparse
import bz2
import json
import lzma
from collections.abc import Callable
from pathlib import Path

import torch
from _shared import corpus

import swsformat
from swsformat.files import atomic_write
from swsformat.provenance import provenance

ROOT = Path(__file__).resolve().parent.parent


def generic_best(sd: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The smallest generic compression of the tensors' own bytes, by name."""
    raw = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in sd.values())
    out = {"xz -9e": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME)), "bzip2 -9": len(bz2.compress(raw, 9))}
    try:
        import zstandard

        out["zstd -19"] = len(zstandard.ZstdCompressor(level=19).compress(raw))
    except ImportError:
        pass
    name = min(out, key=out.get)
    return name, out[name]


def cases(data_root: str | None) -> list[tuple[str, Callable[[], torch.nn.Module], Callable[[torch.nn.Module], float], str]]:
    """(file, model builder, metric, metric name) of each committed trained model that
    keeps its uncoded tensors in float32."""
    import fashion_resnet
    import text_gpt
    import text_lstm

    from swsformat.retrain import data
    from swsformat.retrain.train import evaluate

    _, held = corpus(3_000_000)
    out = [
        ("results/text-gpt/byte-gpt.sws", lambda: text_gpt.ByteGPT(256, 3),
         lambda m: text_gpt.bits_per_byte(m, held), "held-out bits per byte"),
        ("results/text-lstm/byte-lstm-nearest-distill.sws", text_lstm.ByteLSTM,
         lambda m: text_lstm.bits_per_byte(m, held), "held-out bits per byte"),
    ]
    try:
        _, test = data.load("fashion-mnist", data_root, download=False, normalization="standard")
        out.append(("results/fashion-resnet/resnet.sws", lambda: fashion_resnet.ResNet(norm=False),
                    lambda m: evaluate(m, test), "test error %"))
    except Exception as exc:  # noqa: BLE001 - the data set is an optional package
        print(f"fashion-mnist left out: {exc}")
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None)
    p.add_argument("--json", default=str(ROOT / "results" / "raw-dtype" / "summary.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for path, build, metric, metric_name in cases(a.data_root):
        f = ROOT / path
        coded = [t["name"] for t in swsformat.inspect(f) if t["kind"] == "sws"]
        model = swsformat.load_model(f, build())
        sd = swsformat.load_state_dict(f)
        generic, generic_bytes = generic_best(sd)
        row = {"file": path, "metric": metric_name, "committed_bytes": f.stat().st_size,
               "best_generic_own_bytes": {generic: generic_bytes}, "raw_dtype": {}}
        for dtype in (None, torch.float16, torch.bfloat16):
            data = swsformat.encode_bytes(model, compress=coded, raw_dtype=dtype)
            size = len(data)
            with_dtype = swsformat.load_model(data, build())
            value = metric(with_dtype)
            row["raw_dtype"][str(dtype).replace("torch.", "")] = {
                "file_bytes": size, "metric": value, "over_best_generic": size / generic_bytes}
            print(f"{path}: raw_dtype={dtype}: {size} bytes ({size / generic_bytes:.3f}x {generic}), "
                  f"{metric_name} {value:.4f}", flush=True)
        rows.append(row)
    out = {"command": "python scripts/raw_dtype_effect.py", "threads": torch.get_num_threads(),
           "provenance": provenance(ROOT), "results": rows}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.json, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
