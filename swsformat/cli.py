"""The ``sws`` command: compress, encode, info, decode, eval, bench, plot.

``main(argv)`` returns an exit code so tests can call it directly; bad files and bad
arguments print one line to stderr and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .architectures import ARCHITECTURES as REGISTRY
from .errors import SwsEncodeError, SwsError, SwsFormatError, SwsOutputError
from .files import atomic_write, check_output
from .spec import MAGIC, MAX_INDEX_BITS

ARCHITECTURES = tuple(sorted(REGISTRY))


class UsageError(SwsError):
    """A command-line argument that cannot work (reported before any work starts)."""


def _fail(msg: str, code: int = 1) -> int:
    print(f"sws: error: {msg}", file=sys.stderr)
    return code


def printable(text: str) -> str:
    """``text`` with control characters escaped, so that a file cannot drive the terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def import_factory(spec: str) -> Callable[[], torch.nn.Module]:
    """``--module pkg.mod:Net`` or ``path/to/models.py:Net``: a callable of no arguments that
    returns the user's module (a class or a function); errors of the build are one-line UsageErrors
    too, so callers build it before any work."""
    import importlib
    import importlib.util

    where, sep, attr = spec.rpartition(":")
    if not sep or not where or not attr.isidentifier():
        raise UsageError(f"--module {spec}: expected MODULE:CALLABLE, e.g. mypkg.models:Net or models.py:Net")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise FileNotFoundError(f"no such file {where}")
            # As `python file.py` would: its folder first on the path (sibling imports), and
            # the module registered under its name (dataclasses and pickling look it up).
            folder = os.path.dirname(os.path.abspath(where))
            if folder not in sys.path:
                sys.path.insert(0, folder)
            name = Path(where).stem
            loader = importlib.util.spec_from_file_location(name, where)
            mod = importlib.util.module_from_spec(loader)
            sys.modules[name] = mod
            try:
                loader.loader.exec_module(mod)
            except BaseException:
                sys.modules.pop(name, None)
                raise
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())  # as `python -m` does: the user's own package
            mod = importlib.import_module(where)
    except Exception as exc:  # the user's code: any exception is theirs to see, in one line
        raise UsageError(f"--module {spec}: cannot import {where} ({type(exc).__name__}: {exc})") from None
    obj = getattr(mod, attr, None)
    if not callable(obj):
        raise UsageError(f"--module {spec}: {where} has no callable {attr!r}")

    def factory() -> torch.nn.Module:
        try:
            built = obj()
        except Exception as exc:
            raise UsageError(f"--module {spec}: {attr}() failed ({type(exc).__name__}: {exc}); it must build the "
                             "model with no arguments") from None
        if not isinstance(built, torch.nn.Module):
            raise UsageError(f"--module {spec}: {attr}() returned {type(built).__name__}, not a torch.nn.Module")
        return built

    return factory


def _fit(model: torch.nn.Module, sd: dict[str, torch.Tensor], flag: str) -> None:
    """Load ``sd`` into ``model`` or say in one line that the checkpoint does not fit ``flag``.
    A name the checkpoint leaves out is fine when the model ties it to one it has (Hugging
    Face's ``save_pretrained`` drops ``lm_head.weight``)."""
    from .reader import describe_differences, name_differences

    missing, extra = name_differences(model, set(sd))
    if missing or extra:
        raise UsageError(f"{flag}: the checkpoint does not fit it ({describe_differences(missing, extra, 'checkpoint')})")
    try:
        model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # shapes
        detail = " ".join(str(exc).split())[:300]
        raise UsageError(f"{flag}: the checkpoint does not fit it ({detail})") from None


_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_files(path: str) -> list[str]:
    """The weight files of a checkpoint: the file itself, or those of a Hugging Face
    ``save_pretrained`` folder (one file, or the shards its index names)."""
    if not os.path.isdir(path):
        return [path]
    for name in _HF_WEIGHTS:
        f = os.path.join(path, name)
        if not os.path.isfile(f):
            continue
        if not name.endswith(".index.json"):
            return [f]
        try:
            weight_map = json.loads(Path(f).read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"{f}: not a readable shard index ({type(exc).__name__}: {exc})") from None
        for s in shards:
            if not isinstance(s, str) or os.path.basename(s) != s:
                raise UsageError(f"{f}: shard name {s!r} is not a file name in {path}")
        return [os.path.join(path, s) for s in shards]
    raise UsageError(f"{path}: a folder without weights (expected one of {', '.join(_HF_WEIGHTS)})")


def _first_sentences(text: str, limit: int) -> str:
    """``text`` cut at the last sentence end within ``limit`` characters (else at a word)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = cut.rfind(". ")
    return cut[:end + 1] if end > 0 else cut.rsplit(" ", 1)[0] + " ..."


def _load_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from a .pt/.pth/.bin file (plain, or a training checkpoint's ``model`` /
    ``state_dict`` / ``model_state_dict``), a .safetensors file, or a save_pretrained folder."""
    if os.path.isdir(path):
        sd: dict[str, torch.Tensor] = {}
        for f in checkpoint_files(path):
            part = _load_checkpoint(f)
            clash = set(part) & set(sd)
            if clash:
                raise UsageError(f"{f}: tensor {sorted(clash)[0]!r} is also in another shard")
            sd.update(part)
        return sd
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file" if not os.path.exists(path) else f"{path}: not a file")
    with open(path, "rb") as fh:
        head = fh.read(16)
    if head.startswith(MAGIC):
        raise UsageError(f"{path} is already a .sws file: sws info shows it, sws decode turns it back into a checkpoint")
    # What the bytes are, for a file whose name says otherwise.
    kind = ("a PyTorch (zip) checkpoint" if head.startswith(b"PK") else
            "a .safetensors file" if len(head) > 8 and head[8:9] == b"{" else None)
    if path.endswith(".safetensors"):
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise UsageError("reading .safetensors needs the extra: pip install 'swsformat[safetensors]'") from None
        try:
            return load_file(path)
        except Exception as exc:  # safetensors raises its own error types for a damaged file
            hint = f"; its bytes are {kind}: rename it to match" if kind and "PyTorch" in kind else ""
            raise UsageError(f"{path}: not a readable .safetensors file ({type(exc).__name__}: {exc}){hint}") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip, EOF and runtime errors for bad files
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
        unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
        if unsupported:  # a real checkpoint that also pickles objects other than tensors
            raise UsageError(
                f"{path}: the checkpoint holds an object of type {unsupported.group(1)} besides tensors, which a safe "
                "(weights_only) load does not unpickle; save the model's state_dict alone (torch.save(model."
                "state_dict(), 'model.pt')) and encode that") from None
        cause = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Check the documentation|$)", text, re.S)  # not torch's advice to load unsafely
        detail = _first_sentences(" ".join((cause.group(1) if cause else text).split()), 240)
        hint = f"; its bytes are {kind}: name it .safetensors" if kind and "safetensors" in kind else ""
        raise UsageError(
            f"{path}: not a readable PyTorch checkpoint of tensors ({type(exc).__name__}: {detail}){hint}"
        ) from None
    if isinstance(sd, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(sd.get(key), dict) and sd[key]:  # an empty one is no model
                sd = sd[key]
                break
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise UsageError(f"{path} does not hold a state_dict (a dict of tensors)")
    return sd


SAFETENSORS_META = "safetensors."


def _safetensors_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` of a .safetensors input (of every shard of a folder), keyed
    ``safetensors.KEY`` in the .sws file so that ``sws decode x.safetensors`` writes it back."""
    meta: dict[str, str] = {}
    for f in checkpoint_files(path):
        if not f.endswith(".safetensors"):
            continue
        from safetensors import safe_open

        with safe_open(f, "pt") as fh:
            for k, v in (fh.metadata() or {}).items():
                meta.setdefault(SAFETENSORS_META + k, v)
    return meta


def _transformers_state_dict(ref: torch.nn.Module, path: str) -> dict[str, torch.Tensor] | None:
    """A save_pretrained folder read by the model class's own ``from_pretrained``, which renames
    the keys an older transformers version saved (transformers 5 reads ViT's
    ``encoder.layer.0.attention.attention.query`` as ``layers.0.attention.q_proj``); None when
    ``ref`` is no transformers model or ``path`` no folder with a config."""
    if not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))):
        return None
    load = getattr(type(ref), "from_pretrained", None)
    if load is None or not hasattr(ref, "config"):
        return None
    try:
        model = load(path, local_files_only=True)
    except Exception:  # any failure leaves the original error to report
        return None
    return dict(model.state_dict())


def _keep_in_file(keep: list[str], original: dict[str, torch.Tensor], ref: torch.nn.Module | None,
                  folder: bool) -> list[str]:
    """``--keep`` patterns as names of the checkpoint. A save_pretrained folder leaves out a
    weight tied to another (``lm_head.weight`` to the input embedding): with the model at hand
    a pattern naming it keeps the tensor it is tied to; without it, the error says so."""
    import fnmatch

    names = list(original)
    out = []
    for k in keep:
        if k in original or fnmatch.filter(names, k):
            out.append(k)
            continue
        held = {}
        if ref is not None:
            from .reader import ties_to

            ties = ties_to(ref.state_dict(keep_vars=True), set(original))
            held = {n: ties[n] for n in fnmatch.filter(list(ties), k)}
        if not held:
            why = ("; a save_pretrained folder leaves out weights tied to another (lm_head.weight is usually the "
                   "input embedding's): keep that one, or add --module to resolve the tie") if folder and ref is None else ""
            raise UsageError(f"--keep {k!r} matches no tensor of the checkpoint{why}")
        print(f"sws: note: --keep {k!r}: {', '.join(sorted(held))} is tied to {', '.join(sorted(set(held.values())))} "
              "in the checkpoint, which is kept", file=sys.stderr)
        out.extend(sorted(set(held.values())))
    return out


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with VALUE parsed as JSON when it is JSON (numbers, true, null), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _check_compress(a: argparse.Namespace) -> None:
    """Everything about the arguments that can fail, checked before pretraining starts."""
    from .retrain import reproduce

    if a.epochs is not None and a.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {a.epochs}")
    if a.pretrain_epochs is not None and a.pretrain_epochs < 0:
        raise UsageError(f"--pretrain-epochs must be at least 0, got {a.pretrain_epochs}")
    if a.tau is not None and not (math.isfinite(a.tau) and a.tau >= 0):
        raise UsageError(f"--tau must be a finite non-negative number, got {a.tau}")
    a.factory = import_factory(a.module) if a.module else None
    if a.factory is not None:
        from .retrain.models import compressible_parameters

        built = a.factory()
        if not compressible_parameters(built):
            raise UsageError(f"--module {a.module}: the model has no linear, conv, embedding, RNN or attention "
                             "weights for soft weight-sharing")
        if a.pretrained is not None:
            _fit(built, _load_checkpoint(a.pretrained), f"--module {a.module}")
    if a.pretrained is not None and a.pretrain_epochs is not None:
        raise UsageError("--pretrain-epochs has no effect with --pretrained (nothing is pretrained); drop one")
    try:
        reproduce.best_config(a.model or a.module, a.seed, a.epochs, a.tau, dict(a.set or []))
    except (TypeError, ValueError) as exc:
        keys = ", ".join(k for k, _ in a.set or [])
        raise UsageError(f"--set {keys}: {exc}") from None
    check_output(a.output, a.pretrained)
    for extra in (a.json, a.checkpoint):
        if extra is not None:
            check_output(extra, a.pretrained, a.output)
    if a.pretrained is not None and not os.path.isfile(a.pretrained):
        raise UsageError(f"--pretrained {a.pretrained}: no such file")
    if a.plots is not None:
        try:
            import matplotlib  # noqa: F401
            from PIL import Image  # noqa: F401
        except ImportError:
            raise UsageError("--plots needs matplotlib and pillow: pip install 'swsformat[plots]'") from None
        if Path(a.plots).exists() and not Path(a.plots).is_dir():
            raise UsageError(f"--plots {a.plots} is a file, not a folder")
    ckpt = a.checkpoint or f"{a.output}.ckpt"
    if a.resume and not (os.path.exists(ckpt) or os.path.exists(f"{ckpt}.pretrain")):
        raise UsageError(f"--resume: no checkpoint at {ckpt} (retraining) or {ckpt}.pretrain (pretraining)")


def cmd_compress(a: argparse.Namespace) -> int:
    from .retrain import reproduce

    _check_compress(a)
    started = _start_processes() if a.distributed else False
    try:
        reproduce.run(a.model or a.module, a.data, a.output, factory=a.factory, json_path=a.json, epochs=a.epochs,
                      pretrain_epochs=a.pretrain_epochs, tau=a.tau, seed=a.seed, data_root=a.data_root,
                      pretrained=a.pretrained, plots=a.plots, checkpoint=a.checkpoint or f"{a.output}.ckpt",
                      resume=a.resume, normalization=a.normalization, overrides=dict(a.set or []),
                      progress=not a.quiet, distributed=a.distributed)
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 0


def _start_processes() -> bool:
    """Join torchrun's process group (NCCL with CUDA, else gloo); True if this call made it.
    Rank 0 pretrains while the others wait, so the group allows long waits."""
    import datetime

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return False
    if not dist.is_available() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UsageError("--distributed runs under torchrun: torchrun --nproc-per-node N --no-python sws compress ... "
                         "--distributed")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=datetime.timedelta(hours=12))
    return True


def cmd_encode(a: argparse.Namespace) -> int:
    from . import encode_bytes, size_report
    from .encoder import tie_key
    from .quantize import prune_and_cluster
    from .selection import module_weights

    if a.data and not (a.architecture or a.module):
        raise UsageError("--data needs --architecture or --module to build the model it evaluates")
    if a.architecture and a.module:
        raise UsageError("give --architecture (a built-in model) or --module (your own), not both")
    if a.max_error_increase < 0:
        raise UsageError(f"--max-error-increase must be >= 0, got {a.max_error_increase}")
    if not 0.0 <= a.prune < 1.0:
        raise UsageError(f"--prune must be in [0, 1), got {a.prune}")
    if a.prune and not a.clusters:
        raise UsageError("--prune works with --clusters K (prune, then share K values); add --clusters")
    if a.remove_dead and not a.data:
        raise UsageError("--remove-dead needs --data (and --architecture or --module): the result is proven on its test set")
    if a.format_version < 3 and a.coder == "context":
        raise UsageError(f"--coder context needs --format-version 3 (version {a.format_version} has Huffman only)")
    if a.index_bits != "auto" and not 1 <= a.index_bits <= MAX_INDEX_BITS:
        raise UsageError(f"--index-bits must be auto or in [1, {MAX_INDEX_BITS}], got {a.index_bits}")
    if a.clusters is not None and not 1 <= a.clusters <= 255:
        raise UsageError(f"--clusters must be in [1, 255] (a .sws tensor holds at most 255 non-zero values), got {a.clusters}")
    # A folder's own files (weights, shards, index, config) are inputs too: never overwritten.
    inside = [os.path.join(a.input, f) for f in os.listdir(a.input)] if os.path.isdir(a.input) else []
    check_output(a.output, a.input, *inside)
    factory = import_factory(a.module) if a.module else None
    original = _load_checkpoint(a.input)
    if not original:
        raise UsageError(f"{printable(a.input)} holds no tensors: nothing to encode")
    ref = None
    if a.architecture:  # the tensors must fit the named architecture before the file claims it
        from .architectures import build_model

        ref = build_model(a.architecture)
        _fit(ref, original, f"--architecture {a.architecture}")
    elif factory is not None:
        ref = factory()
        try:
            _fit(ref, original, f"--module {a.module}")
        except UsageError:
            renamed = _transformers_state_dict(ref, a.input)
            if renamed is None:
                raise
            _fit(ref, renamed, f"--module {a.module}")
            print(f"sws: note: {printable(a.input)} holds older names of the model's tensors; read through "
                  f"{type(ref).__name__}.from_pretrained, the file uses the model's own names", file=sys.stderr)
            original = renamed
    test = None
    if a.data:  # before any work: missing data must not leave a written file behind
        from .retrain import data as data_mod

        _, test = data_mod.load(a.data, root=a.data_root, normalization=a.normalization)
    a.keep = _keep_in_file(a.keep or [], original, ref, os.path.isdir(a.input))
    sd = original
    # With the model at hand its weights are chosen by layer type; a bare checkpoint's by name and shape.
    weights = sorted(module_weights(ref) & set(original)) if ref is not None else None
    if a.clusters:
        # The loaded tensors are ours (the reference model holds its own copy): quantize them in place.
        sd = prune_and_cluster(original, prune=a.prune, clusters=a.clusters, per_layer=a.per_layer,
                               prune_scope="layer" if a.prune_each_layer else "model", inplace=True, keep=a.keep,
                               compress=weights)
    if a.remove_dead:
        from .architectures import build_model
        from .exact import remove_dead_units_verified_

        model = build_model(a.architecture) if factory is None else factory()
        _fit(model, sd, "the quantized tensors")
        try:
            removed = remove_dead_units_verified_(model, test.x)
        except SwsError as exc:
            raise UsageError(f"--remove-dead: {exc}") from None
        sd = {k: v.to(sd[k].dtype) if k in sd else v for k, v in model.state_dict().items()}
        print(f"exact pruning: {sum(removed.values())} non-zeros that cannot change the output zeroed "
              f"(outputs bit-identical on the {len(test)} test images)")
    meta = {"source": Path(a.input).name, **_safetensors_metadata(a.input)}
    if a.module:
        meta["sws.module"] = a.module
    if test is not None:
        meta["sws.input"] = json.dumps(data_mod.input_spec(a.data, a.normalization))
    arch = {"name": a.architecture, "kwargs": {}} if a.architecture else None
    try:
        data = encode_bytes(sd, compress=weights, keep=a.keep, raw_dtype=getattr(torch, a.raw_dtype) if a.raw_dtype else None,
                            index_bits=a.index_bits, metadata=meta, architecture=arch, smallest=True,
                            coder=a.coder if a.format_version == 3 else "huffman", version=a.format_version)
    except SwsEncodeError as exc:
        if a.clusters or "distinct non-zero values" not in str(exc):
            raise
        first = str(exc).split(". Quantize")[0]
        raise SwsEncodeError(f"{first}. Quantize it: add --clusters K (and --prune P) for post-training k-means, or "
                             "retrain with soft weight-sharing: sws compress") from None
    # Our own bytes: no output limit is needed to report them (encode_bytes has already warned
    # when readers will need --max-output-bytes).
    rep = size_report(data, entropy=False, max_output_bytes=1 << 62)
    errors = None
    if test is not None:  # before writing: a model whose forward fails on the data leaves no file
        from .reader import load_model
        from .retrain.train import evaluate

        try:
            errors = (evaluate(ref, test),
                      evaluate(load_model(data, None if factory is None else factory(), max_output_bytes=1 << 62), test))
        except (RuntimeError, NotImplementedError, TypeError, ValueError) as exc:
            what = f"--module {a.module}" if a.module else f"--architecture {a.architecture}"
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
            raise UsageError(f"{what}: the model's forward failed on --data {a.data} test batches "
                             f"({tuple(test.x.shape[1:])} per sample): {detail}") from None
    atomic_write(a.output, data)
    # The tensors' own bytes, ties once, in the dtypes they came in (raw_dtype may store less).
    own_bytes = sum(t.numel() * t.element_size() for t in {tie_key(t): t for t in original.values()}.values())
    source = sum(os.path.getsize(f) for f in checkpoint_files(a.input))
    if source > 1.1 * rep["dtype_bytes"] + 65536:
        # A training checkpoint: its optimizer state and the like are not the model's bytes.
        against = (f"{own_bytes / len(data):.1f}x smaller than the model's tensors in {printable(a.input)} "
                   f"({own_bytes} bytes of the file's {source}; {rep['compression_rate']:.1f}x against "
                   "float32)")
    else:
        against = (f"{source / len(data):.1f}x smaller than {printable(a.input)} ({source} bytes; "
                   f"{rep['compression_rate']:.1f}x against float32 tensors, {own_bytes / len(data):.1f}x "
                   "against their own dtypes)")
    print(f"wrote {printable(a.output)}: {len(data)} bytes, {against}, "
          + (f"{100 * rep['nonzero_fraction']:.2f}% non-zero" if rep["coded_weights"] else "no tensor coded"))
    if a.clusters and not rep["coded_weights"]:
        floating = [k for k, v in original.items() if v.is_floating_point() and v.dim() >= 2]
        why = ("--keep left every weight as it was" if a.keep else
               "it has no floating tensor of 2+ dimensions" if not floating else
               "the weights of parametrized layers, e.g. torch.nn.utils.parametrizations.weight_norm, are stored as "
               "they are; others are chosen by name (*.weight) without --module")
        print(f"sws: note: --prune/--clusters found no weight tensor to quantize ({why})", file=sys.stderr)
    if errors is not None:
        before, after = errors
        print(f"test error: {before:.2f}% before, {after:.2f}% after ({after - before:+.2f} points)")
        if after - before > a.max_error_increase:
            route = f"--module {a.module}" if a.module else f"--model {a.architecture}"
            print(f"sws: warning: post-training pruning and clustering cost {after - before:.2f} points of test error "
                  f"(more than --max-error-increase {a.max_error_increase:g}); to keep accuracy, retrain with soft "
                  f"weight-sharing: sws compress {route} --pretrained {a.input} -o {a.output}", file=sys.stderr)
    elif a.clusters:
        print("sws: note: accuracy not measured; pass --data with --module (your model) or --architecture "
              "to see what pruning and clustering cost", file=sys.stderr)
    return 0


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: such numbers become null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def cmd_info(a: argparse.Namespace) -> int:
    from . import size_report
    from .reader import SwsFile

    with SwsFile(a.file, max_output_bytes=a.max_output_bytes) as f:
        rep = size_report(f)
        arch, version, library, meta = f.architecture, f.version, f.header.library, f.metadata()
        try:
            spec = f.input_spec()
        except SwsFormatError as exc:
            spec, bad_input = None, str(exc)
        else:
            bad_input = None
    if a.json:
        print(json.dumps(_finite(rep), indent=2, allow_nan=False))
        return 0
    paper = rep["paper_compression_rate"]
    paper = f" (paper accounting {paper:.1f}x)" if paper is not None else " (no coded tensors)"
    print(f"{printable(a.file)}: {rep['file_bytes']} bytes, fp32 {rep['fp32_bytes']} bytes, "
          f"compression rate {rep['compression_rate']:.1f}x{paper}; "
          f"{rep['dtype_compression_rate']:.1f}x against the tensors' own dtypes ({rep['dtype_bytes']} bytes)")
    facts = [f"format version {version}", f"written by {library or '?'}",
             f"architecture {arch['name']} {json.dumps(arch['kwargs'], default=str)}" if arch else "no architecture"]
    if spec is not None:
        facts.append(describe_input(spec))
    elif bad_input:
        facts.append("input record invalid (ignored)")
    others = sorted(k for k in meta if k != "sws.input")
    if others:
        facts.append(f"metadata keys {others}")
    print(printable("; ".join(facts)))
    # Columns as wide as the longest name and shape, so that they never run together.
    nw = max([16] + [len(printable(t["name"])) + 2 for t in rep["tensors"]])
    sw = max([16] + [len(_shape_text(t["shape"])) + 2 for t in rep["tensors"]])
    cols = f"{'tensor':<{nw}}{'shape':<{sw}}{'kind':<5}{'nonzero':>9}{'K':>4}{'b':>3}{'rows':>7}{'gaps':>8}{'(H)':>8}{'values':>8}{'(H)':>8}{'cbook':>6}{'raw':>8}{'CR':>8}"
    print(cols)
    for t in rep["tensors"]:
        t = {**t, "name": printable(t["name"])}
        shape = _shape_text(t["shape"])
        if t["kind"] == "raw" and t.get("coder") == "sparse":
            print(f"{t['name']:<{nw}}{shape:<{sw}}{'sraw':<5}{t['nonzeros']:>9}{'':>4}{'':>3}{'':>7}{t['position_bits']:>8}"
                  f"{'':>8}{'':>8}{'':>8}{'':>6}{t['raw_bits']:>8}{'':>8}")
            continue
        if t["kind"] == "raw":
            print(f"{t['name']:<{nw}}{shape:<{sw}}{'raw':<5}{'':>9}{'':>4}{'':>3}{'':>7}{'':>8}{'':>8}{'':>8}{'':>8}{'':>6}{t['raw_bits']:>8}{'':>8}")
            continue
        if t["kind"] == "alias":
            print(f"{t['name']:<{nw}}{shape:<{sw}}{'tie':<5} same tensor as {printable(t['alias_of'])}")
            continue
        if t["coder"] == "context":
            print(f"{t['name']:<{nw}}{shape:<{sw}}{'ctx':<5}{t['nonzeros']:>9}{t['codebook_size']:>4}{'':>3}"
                  f"{'':>7}{t['coded_bits']:>8}{'':>8}{'':>8}{t['value_entropy_bits']:>8.0f}"
                  f"{t['codebook_bits']:>6}{'':>8}{t['compression_rate']:>8.1f}")
            continue
        print(f"{t['name']:<{nw}}{shape:<{sw}}{'sws':<5}{t['nonzeros']:>9}{t['codebook_size']:>4}{t['index_bits']:>3}"
              f"{t['row_bits']:>7}{t['gap_bits']:>8}{t['gap_entropy_bits']:>8.0f}{t['value_bits']:>8}{t['value_entropy_bits']:>8.0f}"
              f"{t['codebook_bits']:>6}{'':>8}{t['compression_rate']:>8.1f}")
    print(f"(K = shared non-zero values, b = index bits; bits per part; (H) = empirical entropy bound of the stream; "
          f"ctx = context-coded: positions and values in one stream, shown under gaps; "
          f"sraw = raw non-zeros (under raw) with context-coded positions (under gaps); "
          f"header {rep['header_bytes']} bytes, "
          f"overhead {rep['overhead_bytes']} bytes)")
    return 0


def _shape_text(shape: list[int]) -> str:
    return "x".join(map(str, shape)) or "scalar"


DECODE_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


def cmd_decode(a: argparse.Namespace) -> int:
    from .reader import SwsFile

    check_output(a.output, a.file)
    if not a.output.endswith(DECODE_SUFFIXES):
        raise UsageError(f"{printable(a.output)}: name the output {', '.join(DECODE_SUFFIXES[:-1])} (a torch.save "
                         f"file) or {DECODE_SUFFIXES[-1]}")
    safetensors = a.output.endswith(".safetensors")
    if safetensors:
        try:
            from safetensors.torch import save
        except ImportError:
            raise UsageError("writing .safetensors needs the extra: pip install 'swsformat[safetensors]'") from None
    with SwsFile(a.file, max_output_bytes=a.max_output_bytes) as f:
        sd = f.state_dict()
        f_meta = f.metadata()
    copies = []
    if safetensors:
        # safetensors holds no aliases: a tied name is written as a copy of the tensor it shares.
        seen: set[int] = set()
        for name, t in sd.items():
            if t.numel() and t.untyped_storage().data_ptr() in seen:
                sd[name] = t.clone()
                copies.append(name)
            elif t.numel():
                seen.add(t.untyped_storage().data_ptr())
        data = save(sd, metadata={k[len(SAFETENSORS_META):]: v for k, v in f_meta.items()
                                  if k.startswith(SAFETENSORS_META)} or None)
    else:
        buf = io.BytesIO()
        torch.save(sd, buf)
        data = buf.getvalue()
    atomic_write(a.output, data)
    print(f"wrote {printable(a.output)}: {len(sd)} tensors"
          + (f"; tied names written as copies (safetensors has no aliases): {', '.join(copies)}" if copies else ""))
    return 0


def describe_input(spec: dict) -> str:
    """The input record in words: what to feed the model."""
    shape = "x".join(str(d) for d in spec["shape"]) if "shape" in spec else "?"
    text = f"input {spec.get('data', '?')} images {shape}, normalization {spec['normalization']}"
    if "mean" in spec:
        text += f": pixels scaled to [0, 1], then (x - {spec['mean']:g}) / {spec['std']:g}"
    return text


def input_normalization(spec: dict | None, flag: str | None, path: str) -> str:
    """``--normalization`` if given, else the file's record; a file without one needs the flag."""
    if flag is not None:
        return flag
    if spec is None:
        raise UsageError(f"{path} records no input normalization; pass --normalization unit or standard")
    return spec["normalization"]


def eval_batch(model: torch.nn.Module, budget: int = 1 << 24) -> int:
    """A batch size whose largest layer output stays within ``budget`` numbers (a file may
    name a model with huge layers; activations are not counted by the output limit)."""
    widest = max((m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear)), default=1)
    return max(1, min(2000, budget // max(widest, 1)))


def cmd_eval(a: argparse.Namespace) -> int:
    from .reader import SwsFile, load_model
    from .retrain import data as data_mod
    from .retrain.train import evaluate

    with SwsFile(a.file, max_output_bytes=a.max_output_bytes) as f:
        made_from = f.metadata().get("sws.module")
        if f.architecture is None and not a.module:
            hint = f"pass --module {made_from}" if made_from else "pass --module MODULE:CALLABLE that builds your model"
            raise UsageError(f"{a.file} names no built-in architecture; {hint}")
        try:
            spec = f.input_spec()
        except SwsFormatError:
            spec = None  # an invalid record counts as none: --normalization decides
    norm = input_normalization(spec, a.normalization, a.file)
    data = a.data or (spec or {}).get("data") or "mnist"
    if data not in ("mnist", "fashion-mnist"):
        raise UsageError(f"{a.file} was trained on {data!r}, which sws eval cannot load; pass --data")
    module = import_factory(a.module)() if a.module else None
    model = load_model(a.file, module, max_output_bytes=a.max_output_bytes)
    _, test = data_mod.load(data, root=a.data_root, normalization=norm)
    dense = evaluate(model, test, batch_size=eval_batch(model))
    print(f"{printable(a.file)}: test error {dense:.2f}% on {data} ({len(test)} images, normalization {norm})")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from . import bench
    from .reader import SwsFile

    if a.repeat < 3:
        raise UsageError(f"--repeat must be at least 3, got {a.repeat}")
    with SwsFile(a.file, max_output_bytes=a.max_output_bytes) as f:
        if f.architecture is None:
            raise UsageError(f"{a.file} names no built-in architecture; sws bench times built-in models only "
                             "(time your own with swsformat.bench.interleaved)")
    res = bench.run(a.file, devices=a.device or None, max_output_bytes=a.max_output_bytes, repeat=a.repeat)
    print(json.dumps(_finite(res), indent=2) if a.json else bench.format_table(res))
    if res["noisy"]:
        print(f"sws: warning: the machine is busy: quartiles spread over {bench.NOISY:.0%} of the median for "
              f"{', '.join(res['noisy'])}; compare with care or rerun with a larger --repeat", file=sys.stderr)
    return 0


def cmd_plot(a: argparse.Namespace) -> int:
    from .plotting import plot_file

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("plots need matplotlib: pip install 'swsformat[plots]'") from None
    prefix = a.output or str(Path(a.file).with_suffix(""))
    for suffix in ("-histogram.png", "-codebook.png"):
        check_output(prefix + suffix, a.file)
    written = plot_file(a.file, prefix, max_output_bytes=a.max_output_bytes)
    print("wrote " + ", ".join(printable(str(p)) for p in written))
    return 0


def _size(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of bytes, got {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative number of bytes, got {n}")
    return n


def _limit_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-output-bytes", type=_size, default=None, metavar="N",
                   help="decode files whose tensors take up to N bytes (default: max(64 MiB, 4096 x file size))")


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage stays one ``--help`` away)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {printable(message)} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sws", description="Soft weight-sharing compression and .sws files.")
    p.add_argument("--version", action="version", version=f"swsformat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="pretrain, retrain with the mixture prior, quantize and write a .sws file")
    which = c.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", choices=ARCHITECTURES, help="a built-in architecture")
    which.add_argument("--module", metavar="MODULE:CALLABLE",
                       help="your own model: mypkg.models:Net or models.py:Net, built with no arguments")
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
    c.add_argument("--checkpoint", default=None,
                   help="retraining checkpoint, written every epoch (default: OUTPUT.ckpt; pretraining: CHECKPOINT.pretrain)")
    c.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    c.add_argument("--quiet", action="store_true", help="no progress bars or summaries (errors still print)")
    c.add_argument("--normalization", default=None, choices=["unit", "standard"],
                   help="input pixels in [0, 1] or standardised (default: the model's best setting)")
    c.add_argument("--set", action="append", type=_setting, metavar="KEY=VALUE",
                   help="override a config field, e.g. retrain.lr_schedule=constant or prior.pi_zero=0.995")
    c.add_argument("--distributed", action="store_true",
                   help="under torchrun (torchrun --nproc-per-node N --no-python sws compress ... --distributed): "
                        "retrain with DDP, each process on its share of the data; rank 0 writes the files")
    c.set_defaults(func=cmd_compress)

    e = sub.add_parser("encode", help="write a checkpoint (.pt/.pth/.safetensors) as .sws")
    e.add_argument("input")
    e.add_argument("-o", "--output", required=True)
    e.add_argument("--prune", type=float, default=0.0, help="fraction of smallest weights to zero (with --clusters)")
    e.add_argument("--clusters", type=int, default=None, help="quantize weights to this many shared values (k-means)")
    e.add_argument("--per-layer", action="store_true", help="one codebook per layer instead of per model")
    e.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="store these tensors as they are (a name or a shell-style pattern such as 'lm_head.*'; "
                        "repeatable)")
    e.add_argument("--prune-each-layer", action="store_true",
                   help="prune every layer by --prune (default: rank the whole model's weights, each layer keeping "
                        "at least a quarter of the target share)")
    e.add_argument("--raw-dtype", default=None, choices=["float16", "bfloat16"],
                   help="store the floating tensors that are not coded (biases, norms) in this dtype: half their "
                        "bytes, lossy (--keep leaves a tensor as it is)")
    e.add_argument("--index-bits", default="auto", type=lambda s: s if s == "auto" else int(s))
    e.add_argument("--coder", default="auto", choices=["auto", "context", "huffman"],
                   help="entropy coder of coded tensors: auto (default: context where it saves a byte per 4096 weights, "
                        "else Huffman), context (smallest files) or huffman (decode up to ~10x faster per weight)")
    e.add_argument("--format-version", type=int, default=3, choices=[1, 2, 3],
                   help="file format to write (default 3; 2 and 1 for readers older than swsformat 0.3 / 0.2)")
    e.add_argument("--remove-dead", action="store_true",
                   help="zero the weights that cannot change the output (needs --data: proven on its test set)")
    e.add_argument("--architecture", default=None, choices=ARCHITECTURES,
                   help="built-in architecture name to record (and to evaluate)")
    e.add_argument("--module", default=None, metavar="MODULE:CALLABLE",
                   help="your own model (mypkg.models:Net or models.py:Net), to evaluate with --data")
    e.add_argument("--data", default=None, choices=["mnist", "fashion-mnist"], help="report the accuracy cost")
    e.add_argument("--max-error-increase", type=float, default=1.0, metavar="POINTS",
                   help="warn when test error rises by more than this (default 1.0)")
    e.add_argument("--data-root", default=None)
    e.add_argument("--normalization", default="unit", choices=["unit", "standard"],
                   help="how the checkpoint's inputs were normalised (for --data)")
    e.set_defaults(func=cmd_encode)

    i = sub.add_parser("info", help="per-layer sizes, compression rate and entropy bounds")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    _limit_flag(i)
    i.set_defaults(func=cmd_info)

    d = sub.add_parser("decode", help="write the dense state_dict as .pt or .safetensors")
    d.add_argument("file")
    d.add_argument("-o", "--output", required=True)
    _limit_flag(d)
    d.set_defaults(func=cmd_decode)

    v = sub.add_parser("eval", help="test error of a file of a built-in architecture")
    v.add_argument("file")
    v.add_argument("--data", default=None, choices=["mnist", "fashion-mnist"],
                   help="data set (default: the one the file records, else mnist)")
    v.add_argument("--data-root", default=None)
    v.add_argument("--normalization", default=None, choices=["unit", "standard"],
                   help="input normalization (default: the one the file records)")
    v.add_argument("--module", default=None, metavar="MODULE:CALLABLE",
                   help="your own model, for files that name no built-in architecture")
    _limit_flag(v)
    v.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="load and inference timings on this machine, dense vs sparse, CPU and CUDA")
    b.add_argument("file")
    b.add_argument("--device", action="append", help="cpu, cuda (repeatable; default: cpu and cuda if present)")
    b.add_argument("--json", action="store_true")
    b.add_argument("--repeat", type=int, default=15, help="interleaved rounds per timing (default 15)")
    _limit_flag(b)
    b.set_defaults(func=cmd_bench)

    pl = sub.add_parser("plot", help="weight histogram and codebook picture as PNG")
    pl.add_argument("file")
    pl.add_argument("-o", "--output", default=None, help="output prefix (default: FILE without .sws)")
    _limit_flag(pl)
    pl.set_defaults(func=cmd_plot)
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(printable(f"sws: warning: {' '.join(str(message).split())}"), file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a file name that is not valid UTF-8 still prints
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        root = getattr(args, "data_root", None)
        if root is not None and not os.path.isdir(root):
            raise UsageError(f"--data-root {root}: no such folder")
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return args.func(args)
    except (UsageError, SwsOutputError) as exc:
        return _fail(printable(str(exc)), 2)
    except SwsError as exc:
        return _fail(printable(str(exc)))
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as exc:
        where = f": {os.fsdecode(exc.filename)}" if exc.filename else ""
        return _fail(printable(f"{exc.strerror or exc}{where}"))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # the reader of our output went away (e.g. `| head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # one line, never a traceback; SWS_DEBUG=1 shows it
        if os.environ.get("SWS_DEBUG"):
            raise
        detail = " ".join(str(exc).split())[:300]
        return _fail(printable(f"{type(exc).__name__}: {detail} (set SWS_DEBUG=1 for the traceback)"))


if __name__ == "__main__":
    sys.exit(main())
