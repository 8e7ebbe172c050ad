"""The main job: pretrain (or load), compress with soft weight-sharing, write ``.sws`` + JSON.

``sws compress --model lenet5-caffe -o lenet5-caffe.sws`` runs this; the committed files
under ``results/paper/`` were made by it, with the exact command in each JSON.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .. import size_report
from ..files import atomic_write
from ..provenance import provenance
from . import data as data_mod
from .models import build_model
from .pipeline import CompressConfig, compress
from .prior import Mixture, PriorConfig
from .train import RetrainConfig, evaluate, pick_device, pretrain

# Names how pretrain() trains (fused Adam, per-epoch cosine_schedule); part of the
# pretrained-net cache key, so a net trained another way is never reused.
PRETRAIN_RECIPE = "adamf-cos"

# Best settings measured per model (see README, "Reproducing the paper").
BEST: dict[str, dict[str, Any]] = {
    "lenet300-100": {
        "pretrain_epochs": 30, "epochs": 15, "tau": 0.03, "normalization": "standard",
        "overrides": {"bias_clusters": 0, "qat_epochs": 100, "qat_distill": 0.5, "prior.init_std": 0.1},
    },
    "lenet5-caffe": {
        "pretrain_epochs": 20, "epochs": 12, "tau": 0.08, "normalization": "standard",
        "overrides": {"qat_epochs": 20, "qat_distill": 0.5},
    },
    "tutorial-net": {"pretrain_epochs": 20, "epochs": 12, "tau": 0.03, "overrides": {"qat_distill": 0.5}},
}


def pretrained_model(
    model_name: str, data_name: str, train, test, epochs: int, seed: int, device: torch.device,
    progress: bool = True, normalization: str = "unit", checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
) -> tuple[torch.nn.Module, list, bool]:
    """Pretrain ``model_name``, reusing a cached result for the same (model, data, epochs, seed)
    and pretraining recipe.

    Pretraining is deterministic given these on one machine, so the cache only saves time;
    delete ``~/.cache/swsformat/pretrained`` to force a rerun. The file name carries
    :data:`PRETRAIN_RECIPE`, so a net pretrained by an older recipe is never reused.
    ``checkpoint``/``resume``: see :func:`~swsformat.retrain.train.pretrain`; the checkpoint
    is removed once the pretrained net is in the cache.
    """
    import warnings

    from ..errors import SwsCheckpointError
    from . import checkpoint as checkpoint_io
    from .data import cache_dir

    torch.manual_seed(seed)
    model = build_model(model_name).to(device)
    name = f"{model_name}-{data_name}-{normalization}-e{epochs}-s{seed}-{PRETRAIN_RECIPE}.pt"
    path = cache_dir() / "pretrained" / name
    if path.exists():
        try:
            blob = checkpoint_io.load(path, name, map_location=device)
            model.load_state_dict(blob["state_dict"])
            return model, blob["test_errors"], True
        except (SwsCheckpointError, KeyError, RuntimeError) as exc:
            warnings.warn(f"ignoring the cached pretrained net ({exc}); pretraining again", stacklevel=2)
    logs = pretrain(
        model, train, test, epochs=epochs, seed=seed, progress=progress, checkpoint=checkpoint, resume=resume
    )
    errors = [round(log.test_error, 3) for log in logs]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        checkpoint_io.save(path, {"state_dict": model.state_dict(), "test_errors": errors}, name)
    except OSError:
        return model, errors, False  # a read-only cache only costs time next run; keep the checkpoint
    if checkpoint is not None and os.path.exists(checkpoint):
        os.unlink(checkpoint)
    return model, errors, False


def apply_overrides(config: CompressConfig, overrides: dict[str, Any]) -> CompressConfig:
    """``{"retrain.tau_final": 0.5, "finetune_epochs": 1}`` applied to a (frozen) config."""
    from dataclasses import replace

    for key, value in overrides.items():
        parts = key.split(".")
        if len(parts) == 1:
            config = replace(config, **{key: value})
        elif len(parts) == 2 and parts[0] in ("prior", "retrain"):
            sub = getattr(config, parts[0])
            config = replace(config, **{parts[0]: replace(sub, **{parts[1]: value})})
        else:
            raise ValueError(f"cannot set {key!r}: use FIELD, prior.FIELD or retrain.FIELD")
    return config


# Settings for a model of the user's own (``sws compress --module``): the library's defaults.
CUSTOM: dict[str, Any] = {"pretrain_epochs": 20, "epochs": RetrainConfig().epochs, "tau": RetrainConfig().tau}


def best_config(
    model_name: str, seed: int = 0, epochs: int | None = None, tau: float | None = None,
    overrides: dict[str, Any] | None = None,
) -> CompressConfig:
    """The config ``sws compress --model NAME`` runs with: the defaults, ``BEST``'s epochs, tau
    and overrides, then the caller's (``--epochs``, ``--tau``, ``--set``)."""
    best = BEST.get(model_name, CUSTOM)
    retrain = RetrainConfig(epochs=best["epochs"] if epochs is None else epochs, tau=best["tau"] if tau is None else tau)
    return apply_overrides(
        CompressConfig(prior=PriorConfig(), retrain=retrain, seed=seed), {**best.get("overrides", {}), **(overrides or {})}
    )


def run(
    model_name: str,
    data_name: str,
    output: str | os.PathLike,
    json_path: str | os.PathLike | None = None,
    epochs: int | None = None,
    pretrain_epochs: int | None = None,
    tau: float | None = None,
    seed: int = 0,
    data_root: str | None = None,
    pretrained: str | None = None,
    plots: str | None = None,
    progress: bool = True,
    checkpoint: str | None = None,
    resume: bool = False,
    normalization: str | None = None,
    overrides: dict[str, Any] | None = None,
    factory: Callable[[], torch.nn.Module] | None = None,
    distributed: bool = False,
) -> dict[str, Any]:
    """Run the whole job and return the results dict (also written as JSON beside the file).

    ``model_name`` is a built-in architecture, or with ``factory`` (a callable returning the
    user's own module, e.g. ``sws compress --module pkg.mod:Net``) the name recorded for it.
    With ``distributed`` (under ``torchrun``, process group initialized): rank 0 pretrains (or
    reads the cache) and its weights go to every rank, each rank retrains on its share of the
    training set through DDP (the global batch is the config's), rank 0 writes every file and
    returns the results; the other ranks return an empty dict.
    """
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from .ranks import check_same_model, from_writer_tensors, is_writer, world_size
    from .ranks import world as process_group

    group = process_group(distributed)
    ranks = world_size(group)
    writer = is_writer(group)
    progress = progress and writer
    best = CUSTOM if factory is not None else BEST[model_name]
    make = factory or (lambda: build_model(model_name))
    pretrain_epochs = best["pretrain_epochs"] if pretrain_epochs is None else pretrain_epochs
    normalization = best.get("normalization", "unit") if normalization is None else normalization
    origin = provenance()  # before anything is written: outputs may be tracked files
    t0 = time.perf_counter()
    device = pick_device()
    if device.type == "cuda" and group is not None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    train, test = data_mod.load(data_name, root=data_root, normalization=normalization)
    train, test = train.to(device), test.to(device)
    config = best_config(model_name, seed, epochs, tau, overrides)
    if config.retrain.batch_size % ranks:
        from ..errors import SwsTrainingError

        raise SwsTrainingError(f"the batch size {config.retrain.batch_size} does not split over {ranks} processes: "
                               "run a process count that divides it, or --set retrain.batch_size=...")
    pretrain_checkpoint = f"{checkpoint}.pretrain" if checkpoint else None
    if progress:
        say(start_summary(model_name, data_name, data_mod.locate(data_name, data_root), normalization, len(train),
                          len(test), pretrain_epochs, pretrained, config, output, checkpoint, device))
    cached = False
    if not writer:  # rank 0 pretrains; its weights arrive below
        torch.manual_seed(seed)
        model, pre_errors = make().to(device), []
    elif pretrained:
        torch.manual_seed(seed)
        model = make().to(device)
        model.load_state_dict(torch.load(pretrained, map_location=device, weights_only=True))
        pre_errors: list = []
    elif factory is not None:  # the user's code may change between runs: no cache, a checkpoint only
        torch.manual_seed(seed)
        model = make().to(device)
        logs = pretrain(model, train, test, epochs=pretrain_epochs, seed=seed, progress=progress,
                        checkpoint=pretrain_checkpoint, resume=resume)
        pre_errors = [round(log.test_error, 3) for log in logs]
    else:
        model, pre_errors, cached = pretrained_model(
            model_name, data_name, train, test, pretrain_epochs, seed, device, progress, normalization,
            checkpoint=pretrain_checkpoint, resume=resume,
        )
    from_writer_tensors(model.state_dict().values(), group)
    pretrained_sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    recorder = None
    if plots and writer and config.prior_groups == "shared":  # one mixture per layer has no single movie
        from .plots import MovementRecorder

        recorder = MovementRecorder(model)
    metadata = {"sws.input": json.dumps(data_mod.input_spec(data_name, normalization))}
    if factory is not None:
        metadata["sws.module"] = model_name
    forward, batches = None, train
    if group is not None:
        forward = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        dataset = TensorDataset(train.x, train.y)
        share = DistributedSampler(dataset, num_replicas=ranks, rank=torch.distributed.get_rank(group), seed=seed)
        batches = DataLoader(dataset, batch_size=config.retrain.batch_size // ranks, sampler=share)
    result = compress(
        model, batches, test, config, path=output, on_epoch=recorder, progress=progress,
        checkpoint=checkpoint, resume=resume, metadata=metadata, distributed=group is not None, forward=forward,
    )
    check_same_model(model, group)
    if not writer:
        return {}
    for done in (checkpoint, pretrain_checkpoint):
        if done and os.path.exists(done):
            os.unlink(done)  # the run is complete: nothing left to resume
    report = size_report(output)
    out = {
        "command": " ".join(["sws"] + sys.argv[1:]) if Path(sys.argv[0]).name == "sws" else " ".join(sys.argv),
        "model": model_name,
        "module": model_name if factory is not None else None,
        "data": data_name,
        "file": Path(output).name,
        "seed": seed,
        "normalization": normalization,
        "config": config.to_dict(),
        "pretrain_epochs": pretrain_epochs if not pretrained else None,
        "pretrained_from": pretrained,
        "pretrain_test_error_per_epoch": pre_errors,
        "pretrain_from_cache": cached,
        "retrain_test_error_per_epoch": [round(log.test_error, 3) for log in result.logs],
        "retrain_epoch_seconds": [round(log.seconds, 2) for log in result.logs],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "processes": ranks,
        "provenance": origin,
        **{k: v for k, v in result.summary().items() if k != "seconds"},
        "nonzero_fraction": report["nonzero_fraction"],
        "file_bytes": report["file_bytes"],
        "fp32_bytes": report["fp32_bytes"],
        "compression_rate": report["compression_rate"],
        "paper_compression_rate": report["paper_compression_rate"],
        "mixture": [_mixture_json(m) for m in result.mixture] if isinstance(result.mixture, list)
        else _mixture_json(result.mixture),
        "decoded_test_error": None,
    }
    # Evaluate the file as a user would: decode it into a fresh module.
    from ..reader import load_model

    out["decoded_test_error"] = evaluate(load_model(output, None if factory is None else make(), device=device), test)
    json_path = json_path or str(Path(output).with_suffix(".json"))
    atomic_write(json_path, (json.dumps(out, indent=2) + "\n").encode())
    if plots:
        from .plots import flat_weights, histograms, mixture_plot

        folder = Path(plots)
        folder.mkdir(parents=True, exist_ok=True)
        stem = model_name if factory is None else Path(output).stem
        ref = make()
        ref.load_state_dict({k: v.cpu() for k, v in pretrained_sd.items()})
        retrained = recorder.frames[-1][1] if recorder and recorder.frames else flat_weights(model)
        histograms(
            {"pretrained": flat_weights(ref)[recorder.idx] if recorder else flat_weights(ref),
             "retrained": retrained, "quantized": flat_weights(model)[recorder.idx] if recorder else flat_weights(model)},
            folder / f"{stem}-histograms.png",
        )
        if not isinstance(result.mixture, list):  # one mixture per layer: no single picture
            mixture_plot(retrained, result.mixture, folder / f"{stem}-mixture.png")
        if recorder:
            recorder.gif(folder / f"{stem}-movement.gif")
    if progress:
        say(final_summary(out, output, json_path, plots))
    return out


def _mixture_json(mixture: Mixture) -> dict[str, list[float]]:
    return {k: [round(float(x), 6) for x in getattr(mixture, k)] for k in ("means", "stds", "pi")}


def say(text: str) -> None:
    """A message for the person running the job, on stderr beside the progress bars."""
    print(text, file=sys.stderr, flush=True)


def start_summary(
    model_name: str, data_name: str, folder: Path | None, normalization: str, n_train: int, n_test: int,
    pretrain_epochs: int, pretrained: str | None, config: CompressConfig, output: str | os.PathLike,
    checkpoint: str | None, device: torch.device,
) -> str:
    """What the job is about to do, before the first (long) step."""
    c = config
    first = f"loading {pretrained}" if pretrained else f"pretraining {_n(pretrain_epochs, 'epoch')}"
    if not pretrained and model_name in BEST:
        first += " (reused from the cache if done before)"
    lines = [
        f"sws compress: {model_name} on {data_name} ({n_train:,} train / {n_test:,} test images from {folder}, "
        f"normalization {normalization}), on {device} with {torch.get_num_threads()} threads",
        f"  steps: {first}; retraining {_n(c.retrain.epochs, 'epoch')} under the prior (tau {c.retrain.tau:g}); "
        f"quantization-aware fine-tune {_n(c.qat_epochs, 'epoch')}; codebook fine-tune {_n(c.finetune_epochs, 'epoch')}",
        f"  writes {output} and its JSON; checkpoints to {checkpoint} after every epoch "
        "(interrupted? run the same command with --resume)" if checkpoint else f"  writes {output} and its JSON",
    ]
    return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def final_summary(out: dict[str, Any], output: str | os.PathLike, json_path: str, plots: str | None) -> str:
    """What was written, what it measured and what to do next."""
    module = out.get("module")
    module_flag = f" --module {module}" if module else ""
    module_arg = ", YourModule()" if module else ""
    wrote = f"{output} ({out['file_bytes']:,} bytes)" + f", {json_path}" + (f", plots in {plots}" if plots else "")
    return "\n".join([
        f"wrote {wrote}",
        f"  test error {out['pretrained_error']:.2f}% pretrained -> {out['decoded_test_error']:.2f}% from the file; "
        f"{out['compression_rate']:.1f}x smaller than float32 ({100 * out['nonzero_fraction']:.2f}% of weights non-zero)",
        f"  next: sws info {output}  |  sws eval {output}{module_flag}  |  python -c \"import swsformat; "
        f"m = swsformat.load_model('{output}'{module_arg})\"",
    ])


__all__ = ["BEST", "pretrained_model", "run"]
