"""The ``sws`` command: compress, encode, info, decode, eval, bench, plot.

``main(argv)`` returns an exit code so tests can call it directly; bad files and bad
arguments print one line to stderr and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from . import __version__
from .errors import SwsError


def _fail(msg: str, code: int = 1) -> int:
    print(f"sws: error: {msg}", file=sys.stderr)
    return code


def _load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise SystemExit(_fail("reading .safetensors needs the extra: pip install 'swsformat[safetensors]'")) from None
        return load_file(path)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state_dict (a dict of tensors)")
    return sd


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (numbers, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_compress(a: argparse.Namespace) -> int:
    from .retrain import reproduce

    reproduce.run(a.model, a.data, a.output, json_path=a.json, epochs=a.epochs, pretrain_epochs=a.pretrain_epochs,
                  tau=a.tau, seed=a.seed, data_root=a.data_root, pretrained=a.pretrained, plots=a.plots,
                  checkpoint=a.checkpoint or f"{a.output}.ckpt", resume=a.resume, normalization=a.normalization,
                  overrides=dict(a.set or []))
    return 0


def cmd_encode(a: argparse.Namespace) -> int:
    from . import encode, size_report
    from .quantize import prune_and_cluster

    original = _load_checkpoint(a.input)
    sd = original
    if a.clusters:
        sd = prune_and_cluster(original, prune=a.prune, clusters=a.clusters, per_layer=a.per_layer)
    meta = {"source": Path(a.input).name}
    arch = {"name": a.architecture, "kwargs": {}} if a.architecture else None
    size = encode(sd, a.output, index_bits=a.index_bits, metadata=meta, architecture=arch, smallest=True)
    rep = size_report(a.output, entropy=False)
    print(f"wrote {a.output}: {size} bytes, compression rate {rep['compression_rate']:.1f}x, "
          f"{100 * rep['nonzero_fraction']:.2f}% non-zero")
    if a.data:
        from .decoder import load_model
        from .retrain import data as data_mod
        from .retrain.train import evaluate

        if not a.architecture:
            return _fail("--data needs --architecture to build the model", 2)
        _, test = data_mod.load(a.data, root=a.data_root, normalization=a.normalization)
        from .retrain.models import build_model

        ref = build_model(a.architecture)
        ref.load_state_dict(original)
        before, after = evaluate(ref, test), evaluate(load_model(a.output), test)
        print(f"test error: {before:.2f}% before, {after:.2f}% after ({after - before:+.2f} points)")
    return 0


def cmd_info(a: argparse.Namespace) -> int:
    from . import size_report

    rep = size_report(a.file)
    if a.json:
        print(json.dumps(rep, indent=2))
        return 0
    print(f"{a.file}: {rep['file_bytes']} bytes, fp32 {rep['fp32_bytes']} bytes, "
          f"compression rate {rep['compression_rate']:.1f}x (paper accounting {rep['paper_compression_rate']:.1f}x)")
    cols = f"{'tensor':<16}{'shape':<16}{'kind':<5}{'nonzero':>9}{'K':>4}{'b':>3}{'rows':>7}{'gaps':>8}{'(H)':>8}{'values':>8}{'(H)':>8}{'cbook':>6}{'raw':>8}{'CR':>8}"
    print(cols)
    for t in rep["tensors"]:
        shape = "x".join(map(str, t["shape"])) or "scalar"
        if t["kind"] == "raw":
            print(f"{t['name']:<16}{shape:<16}{'raw':<5}{'':>9}{'':>4}{'':>3}{'':>7}{'':>8}{'':>8}{'':>8}{'':>8}{'':>6}{t['raw_bits']:>8}{'':>8}")
            continue
        print(f"{t['name']:<16}{shape:<16}{'sws':<5}{t['nonzeros']:>9}{t['codebook_size'] + 1:>4}{t['index_bits']:>3}"
              f"{t['row_bits']:>7}{t['gap_bits']:>8}{t['gap_entropy_bits']:>8.0f}{t['value_bits']:>8}{t['value_entropy_bits']:>8.0f}"
              f"{t['codebook_bits']:>6}{'':>8}{t['compression_rate']:>8.1f}")
    print(f"(bits per part; (H) = empirical entropy bound of the stream; header {rep['header_bytes']} bytes, "
          f"overhead {rep['overhead_bytes']} bytes)")
    return 0


def cmd_decode(a: argparse.Namespace) -> int:
    from . import load_state_dict

    sd = load_state_dict(a.file)
    if a.output.endswith(".safetensors"):
        try:
            from safetensors.torch import save_file
        except ImportError:
            return _fail("writing .safetensors needs the extra: pip install 'swsformat[safetensors]'")
        save_file(sd, a.output)
    else:
        torch.save(sd, a.output)
    print(f"wrote {a.output}: {len(sd)} tensors")
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from .decoder import load_model, read_header
    from .retrain import data as data_mod
    from .retrain.train import evaluate

    # The file records how its inputs were normalised; files without the record used "standard".
    meta = read_header(a.file)["metadata"]
    norm = json.loads(meta["sws.input"])["normalization"] if "sws.input" in meta else "standard"
    _, test = data_mod.load(a.data, root=a.data_root, normalization=norm)
    dense = evaluate(load_model(a.file), test)
    print(f"{a.file}: test error {dense:.2f}% on {a.data} ({len(test)} images)")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from . import bench

    res = bench.run(a.file, devices=a.device or None)
    print(json.dumps(res, indent=2) if a.json else bench.format_table(res))
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plotting import plot_file

    written = plot_file(a.file, a.output)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sws", description="Soft weight-sharing compression and .sws files.")
    p.add_argument("--version", action="version", version=f"swsformat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="pretrain, retrain with the mixture prior, quantize and write a .sws file")
    c.add_argument("--model", required=True, choices=["lenet300-100", "lenet5-caffe", "tutorial-net"])
    c.add_argument("--data", default="mnist", choices=["mnist", "fashion-mnist"])
    c.add_argument("--data-root", default=None, help="folder with the IDX .gz files (default: $SWSFORMAT_DATA, cache, download)")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--json", default=None, help="where to write the results JSON (default: OUTPUT with .json)")
    c.add_argument("--epochs", type=int, default=None, help="retraining epochs (default: the model's best setting)")
    c.add_argument("--pretrain-epochs", type=int, default=None)
    c.add_argument("--pretrained", default=None, help="a pretrained state_dict .pt to start from")
    c.add_argument("--tau", type=float, default=None)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--plots", default=None, help="folder for histograms, mixture and the weight-movement GIF")
    c.add_argument("--checkpoint", default=None, help="retraining checkpoint, written every epoch (default: OUTPUT.ckpt)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    c.add_argument("--normalization", default=None, choices=["unit", "standard"],
                   help="input pixels in [0, 1] or standardised (default: the model's best setting)")
    c.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE",
                   help="override a config field, e.g. retrain.lr_schedule=constant or prior.pi_zero=0.995")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("encode", help="write a checkpoint (.pt/.pth/.safetensors) as .sws")
    e.add_argument("input")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--prune", type=float, default=0.0, help="fraction of smallest weights to zero (with --clusters)")
    e.add_argument("--clusters", type=int, default=0, help="quantize weights to this many shared values (k-means)")
    e.add_argument("--per-layer", action="store_true", help="one codebook per layer instead of per model")
    e.add_argument("--index-bits", default="auto", type=lambda s: s if s == "auto" else int(s))
    e.add_argument("--architecture", default=None, help="built-in architecture name to record (and to evaluate)")
    e.add_argument("--data", default=None, choices=["mnist", "fashion-mnist"], help="report the accuracy cost")
    e.add_argument("--data-root", default=None)
    e.add_argument("--normalization", default="unit", choices=["unit", "standard"],
                   help="how the checkpoint's inputs were normalised (for --data)")
    e.set_defaults(func=cmd_encode)

    i = sub.add_parser("info", help="per-layer sizes, compression rate and entropy bounds")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("decode", help="write the dense state_dict as .pt or .safetensors")
    d.add_argument("file")
    d.add_argument("-o", "--output", required=True)
    d.set_defaults(func=cmd_decode)

    v = sub.add_parser("eval", help="test error of a file of a built-in architecture")
    v.add_argument("file")
    v.add_argument("--data", default="mnist", choices=["mnist", "fashion-mnist"])
    v.add_argument("--data-root", default=None)
    v.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="load and inference timings on this machine, dense vs sparse, CPU and CUDA")
    b.add_argument("file")
    b.add_argument("--device", action="append", help="cpu, cuda (repeatable; default: cpu and cuda if present)")
    b.add_argument("--json", action="store_true")
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plot", help="weight histogram and codebook picture as PNG")
    pl.add_argument("file")
    pl.add_argument("-o", "--output", default=None, help="output prefix (default: FILE without .sws)")
    pl.set_defaults(func=cmd_plot)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SwsError as exc:
        return _fail(str(exc))
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        return _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))
    except (ValueError, RuntimeError, OSError) as exc:
        return _fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
