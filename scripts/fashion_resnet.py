"""Soft weight-sharing beyond MNIST: a ResNet with BatchNorm on Fashion-MNIST.

The data comes from Debian's ``dataset-fashion-mnist`` package (``apt-get install -y
dataset-fashion-mnist``; the loader finds ``/usr/share/datasets/fashion-mnist``) or
``--data-root``. The script pretrains a small ResNet (three stages of basic blocks, BatchNorm,
global average pooling) with its own loop over a ``DataLoader``, compresses it with
``SoftWeightSharing`` in that same loop, fine-tunes the quantized net with the user-style loss,
writes a ``.sws`` file and reads it back into a fresh module. For comparison it writes the
post-training path (``prune_and_cluster`` + ``encode``, what ``sws encode --prune --clusters``
does) at several sparsities, and the pretrained weights as safetensors fp32 and fp16. Results,
with their provenance, go to ``results/fashion-resnet/summary.json``.

    python scripts/fashion_resnet.py                            # about 40 minutes on 2 cores
    python scripts/fashion_resnet.py --epochs 1 --limit 2000 --init-zero-std 0.01 --out /tmp/f   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from _shared import file_size
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import swsformat
from swsformat.provenance import provenance
from swsformat.quantize import prune_and_cluster
from swsformat.retrain import PriorConfig, data, distillation_loss
from swsformat.retrain.train import cosine_schedule, evaluate

ROOT = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    """A basic residual block: two 3x3 conv + BatchNorm, a 1x1 projection when the shape changes.
    With ``norm=False`` (BatchNorm folded into the convolutions) the convs carry biases instead."""

    def __init__(self, cin: int, cout: int, stride: int, norm: bool = True) -> None:
        super().__init__()
        bn = (lambda c: nn.BatchNorm2d(c)) if norm else (lambda c: nn.Identity())
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=not norm)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=not norm)
        self.bn2 = bn(cout)
        self.short = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=not norm), bn(cout))
            if stride != 1 or cin != cout else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10, norm: bool = True) -> None:
        super().__init__()
        bn = nn.BatchNorm2d(widths[0]) if norm else nn.Identity()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=not norm), bn, nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(cin, w, 1 if i == 0 else 2, norm))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def conv_bn_pairs(model: ResNet) -> list[tuple[str, str]]:
    """(conv, BatchNorm) module names, each BatchNorm right after its conv."""
    pairs = [("stem.0", "stem.1")]
    for i, block in enumerate(model.blocks):
        pairs += [(f"blocks.{i}.conv1", f"blocks.{i}.bn1"), (f"blocks.{i}.conv2", f"blocks.{i}.bn2")]
        if isinstance(block.short, nn.Sequential):
            pairs.append((f"blocks.{i}.short.0", f"blocks.{i}.short.1"))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: ResNet) -> ResNet:
    """The same function (eval mode) without BatchNorm: each BN's scale folded into its conv's
    weights, its shift into a bias, as for deployment. BatchNorm makes the weights before it
    scale-free, so a prior could shrink them towards zero at no cost to the loss and the snap
    would then prune them all; folded, the weights carry their real scale."""
    folded = ResNet(norm=False)
    mods = dict(model.named_modules())
    sd = {k: v for k, v in model.state_dict().items() if k in folded.state_dict()}
    for conv, bn in conv_bn_pairs(model):
        b = mods[bn]
        scale = b.weight / torch.sqrt(b.running_var + b.eps)
        sd[f"{conv}.weight"] = mods[conv].weight * scale[:, None, None, None]
        sd[f"{conv}.bias"] = b.bias - b.running_mean * scale
    folded.load_state_dict(sd)
    return folded


def task_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def train(model: nn.Module, loader: DataLoader, epochs: int, lr: float, sws=None, desc: str = "train") -> None:
    """The user's own loop: Adam with cosine decay; the prior's gradient added after backward."""
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr}, *(sws.param_groups() if sws else [])])
    sched = cosine_schedule(opt, epochs * len(loader))
    model.train()
    for epoch in range(epochs):
        if sws is not None:
            sws.new_epoch()
        bar = tqdm(loader, desc=f"{desc} {epoch + 1}/{epochs}")
        for x, y in bar:
            loss = task_loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            extra = sws.add_complexity_grad_() if sws is not None else 0.0
            opt.step()
            sched.step()
            bar.set_postfix(loss=f"{float(loss):.3f}", complexity=f"{extra:.3g}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=8, help="pretraining epochs; retraining takes as many")
    p.add_argument("--sws-epochs", type=int, default=None, help="retraining epochs (default: as --epochs)")
    p.add_argument("--assign", choices=("map", "nearest"), default="map",
                   help="snap rule: the paper's most probable component, or the nearest mean")
    p.add_argument("--qat-epochs", type=int, default=3)
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of the pretrained net's soft outputs in the fine-tuning loss (0: labels only)")
    p.add_argument("--tau", type=float, default=0.05)
    p.add_argument("--init-std", type=float, default=0.05, help="starting std of the non-zero components")
    p.add_argument("--init-zero-std", type=float, default=PriorConfig.init_zero_std,
                   help="the zero component's starting std (smoke runs, too short to narrow it, use 0.01)")
    p.add_argument("--scale-to-weights", action="store_true",
                   help="read the prior's stds and hyper-priors relative to each layer's weight RMS "
                        "(PriorConfig.scale_to_weights; then 0.05 = the weights' own RMS)")
    p.add_argument("--pi-zero", type=float, default=PriorConfig.pi_zero, help="the zero component's mixing proportion")
    p.add_argument("--groups", choices=("shared", "layer"), default="layer",
                   help="one mixture for all layers, or one per layer (folded layers differ in scale)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke runs)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--pretrained", default=None,
                   help="a state_dict file: loaded if it exists, else written after pretraining")
    p.add_argument("--out", default=str(ROOT / "results" / "fashion-resnet"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    origin = provenance(ROOT)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    train_split, test = data.load("fashion-mnist", a.data_root, download=False, normalization="standard")
    if a.limit:
        train_split = train_split.subset(a.limit)
    dataset = TensorDataset(train_split.x, train_split.y)
    loader = DataLoader(dataset, batch_size=a.batch, shuffle=True, generator=torch.Generator().manual_seed(a.seed))
    with_bn = ResNet()
    cached = bool(a.pretrained) and Path(a.pretrained).exists()
    if cached:
        with_bn.load_state_dict(torch.load(a.pretrained, weights_only=True))
    else:
        train(with_bn, loader, a.epochs, 2e-3, desc="pretrain")
        if a.pretrained:
            torch.save(with_bn.state_dict(), a.pretrained)
    pre = evaluate(with_bn, test)
    with_bn_sd = {k: v.clone() for k, v in with_bn.state_dict().items()}
    model = fold_batchnorm(with_bn.eval())
    folded_error = evaluate(model, test)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = ResNet(norm=False)
    teacher.load_state_dict(pretrained)
    teacher.eval()

    prior = PriorConfig(init_std=a.init_std, init_zero_std=a.init_zero_std, pi_zero=a.pi_zero,
                        scale_to_weights=a.scale_to_weights)
    sws = swsformat.SoftWeightSharing(model, prior, dataset_size=len(dataset), tau=a.tau,
                                      groups=None if a.groups == "shared" else a.groups)
    sws_epochs = a.sws_epochs or a.epochs
    train(model, loader, sws_epochs, 1e-3, sws, desc="soft weight-sharing")
    retrained = evaluate(model, test)
    done = sws.finalize_(assign=a.assign)
    snapped = evaluate(model, test)
    sws.finetune_(loader, epochs=a.qat_epochs, lr=3e-4,
                  loss_fn=distillation_loss(teacher, a.distill) if a.distill > 0 else task_loss)
    final = evaluate(model, test)

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "resnet.sws"
    swsformat.encode(model, path, compress=sws.coded_names(), metadata={"sws.data": "fashion-mnist, standardized"})
    loaded = ResNet(norm=False)
    swsformat.load_model(path, loaded)
    decoded = evaluate(loaded, test)
    if decoded != final:
        raise SystemExit(f"the decoded file gives {decoded}% error, the model in memory {final}%")
    coded = sws.coded_names()
    sd = model.state_dict()
    kept = sum(int(sd[n].count_nonzero()) for n in coded)
    total = sum(sd[n].numel() for n in coded)

    def post_training(prune: float) -> dict[str, float]:
        """``sws encode --prune P --clusters K`` on the pretrained (folded) weights."""
        net = ResNet(norm=False)
        net.load_state_dict(prune_and_cluster(pretrained, prune=prune, clusters=done.values_used))
        size = file_size(lambda f: swsformat.encode(net, f, smallest=True))
        return {"prune": prune, "test_error": evaluate(net, test), "file_bytes": size}

    baseline = [post_training(q) for q in sorted({0.5, 0.7, 0.8, 0.9, round(1 - kept / total, 4)})]
    reach = [b for b in baseline if b["test_error"] <= final]
    from safetensors.torch import save_file

    fp32 = file_size(lambda f: save_file({k: v.contiguous() for k, v in with_bn_sd.items()}, str(f)))
    fp16 = file_size(lambda f: save_file(
        {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in with_bn_sd.items()}, str(f)))
    folded32 = file_size(lambda f: save_file({k: v.contiguous() for k, v in pretrained.items()}, str(f)))
    rep = swsformat.size_report(path)
    summary = {
        "command": " ".join(["python", "scripts/fashion_resnet.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "ResNet: 3x3 stem 16, basic blocks 16-32-64 (stride 1, 2, 2), BatchNorm, global average pool, "
                 f"linear 10; BatchNorm folded into the convs after pretraining; "
                 f"{sum(p.numel() for p in model.parameters())} parameters, {total} under the prior",
        "data": {"train": len(dataset), "test": len(test), "normalization": "standard"},
        "pretrained_from_cache": cached,
        "epochs": a.epochs, "sws_epochs": sws_epochs, "assign": a.assign, "qat_epochs": a.qat_epochs, "distill": a.distill, "tau": a.tau, "pi_zero": a.pi_zero, "scale_to_weights": a.scale_to_weights, "groups": a.groups, "init_std": a.init_std, "init_zero_std": a.init_zero_std, "batch": a.batch,
        "seed": a.seed, "threads": torch.get_num_threads(),
        "test_error": {"pretrained": pre, "batchnorm_folded": folded_error, "retrained": retrained, "snapped": snapped, "final": final,
                       "decoded_file": decoded},
        "nonzero_fraction": kept / total,
        "values_used": done.values_used,
        "bits_per_coded_weight": 8 * rep["file_bytes"] / total,
        "file_bytes": rep["file_bytes"],
        "safetensors_fp32_bytes": fp32,
        "safetensors_fp16_bytes": fp16,
        "safetensors_fp32_folded_bytes": folded32,
        "rate_vs_safetensors_fp32": fp32 / rep["file_bytes"],
        "post_training": baseline,
        "post_training_smallest_at_same_error": min(reach, key=lambda b: b["file_bytes"]) if reach else None,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "provenance": origin,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("test_error", "nonzero_fraction", "file_bytes",
                                              "rate_vs_safetensors_fp32", "post_training_smallest_at_same_error")}))


if __name__ == "__main__":
    main()
