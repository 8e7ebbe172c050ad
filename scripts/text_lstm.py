"""Soft weight-sharing beyond MNIST: a byte-level LSTM language model on real text.

The text is the Python standard library's own sources (present wherever Python is); every
tenth file is held out. The script pretrains the model, compresses it with
``SoftWeightSharing`` inside a plain training loop of its own (the API a user with their own
model has), fine-tunes the quantized net, writes a ``.sws`` file, and compares with
post-training pruning + k-means at the same number of non-zero weights. Results, with their
provenance, go to ``summary.json`` beside the file in ``--out``; the committed run (its command
is in the JSON) is ``results/text-lstm/summary-nearest-distill.json`` with its ``.sws`` file.

    python scripts/text_lstm.py                      # about an hour on 2 cores
    python scripts/text_lstm.py --steps 20 --qat-steps 5 --init-zero-std 0.01 --out /tmp/t   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from _shared import corpus, file_size
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

import swsformat
from swsformat.provenance import provenance
from swsformat.quantize import prune_and_cluster
from swsformat.retrain import PriorConfig, distillation_loss
from swsformat.retrain.train import cosine_schedule

ROOT = Path(__file__).resolve().parent.parent


class ByteLSTM(nn.Module):
    def __init__(self, embed: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.out = nn.Linear(hidden, 256)
        # Small embeddings, as language models initialise them (GPT-2: std 0.02): torch's N(0, 1)
        # would put the embedding on a scale 20x the LSTM's, and one mixture serves all weights.
        nn.init.normal_(self.emb.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.lstm(self.emb(x))[0])


class Flat(nn.Module):
    """Logits as ``(batch * time, 256)``: the layout ``distillation_loss`` and cross-entropy read."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).reshape(-1, 256)


def batches(text: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    """Random windows of ``seq + 1`` bytes: inputs and next-byte targets."""
    while True:
        starts = torch.randint(0, text.numel() - seq - 1, (batch,), generator=gen)
        idx = starts[:, None] + torch.arange(seq + 1)
        chunk = text[idx]
        yield chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, text: torch.Tensor, seq: int = 256) -> float:
    model.eval()
    n = (text.numel() - 1) // seq * seq
    x, y = text[:n].view(-1, seq), text[1 : n + 1].view(-1, seq)
    total = sum(float(lm_loss(model, x[i : i + 64], y[i : i + 64])) * x[i : i + 64].numel() for i in range(0, len(x), 64))
    model.train()
    return total / x.numel() / math.log(2)


def train(model, steps, lr, data, sws=None, desc="train"):
    opt = torch.optim.Adam([{"params": model.parameters(), "lr": lr}, *(sws.param_groups() if sws else [])])
    sched = cosine_schedule(opt, steps)
    bar = tqdm(range(steps), desc=desc)
    for step in bar:
        if sws is not None and step % 200 == 0:
            sws.new_epoch()
        x, y = next(data)
        loss = lm_loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        extra = sws.add_complexity_grad_() if sws is not None else 0.0
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{float(loss.detach()):.3f}", complexity=f"{extra:.3g}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4000, help="pretraining steps")
    p.add_argument("--sws-steps", type=int, default=None, help="retraining steps (default: as --steps)")
    p.add_argument("--qat-steps", type=int, default=1000, help="quantization-aware fine-tuning steps")
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--groups", choices=("shared", "layer"), default="layer", help="one mixture, or one per weight")
    p.add_argument("--assign", choices=("map", "nearest"), default="nearest",
                   help="how finalize_ picks each weight's component")
    p.add_argument("--pi-zero", type=float, default=0.9, help="the zero component's mixing proportion")
    p.add_argument("--init-std", type=float, default=0.05, help="spread of the non-zero means at the start")
    p.add_argument("--scale-to-weights", action="store_true",
                   help="read the prior's stds and hyper-priors relative to each group's own weights")
    p.add_argument("--init-zero-std", type=float, default=0.05,
                   help="the zero component's starting std (smoke runs, too short to narrow it, use 0.01)")
    p.add_argument("--distill", type=float, default=0.5,
                   help="weight of the pretrained net's soft outputs in the fine-tune's loss (0: labels only)")
    p.add_argument("--pretrained", default=None, help="a state_dict file: loaded if it exists, else written")
    p.add_argument("--bytes", type=int, default=3_000_000)
    p.add_argument("--out", default=str(ROOT / "results" / "text-lstm"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    origin = provenance(ROOT)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    text, held = corpus(a.bytes)
    gen = torch.Generator().manual_seed(a.seed)
    data = batches(text, 128, 32, gen)
    model = ByteLSTM()
    cached = bool(a.pretrained) and Path(a.pretrained).exists()
    if cached:
        model.load_state_dict(torch.load(a.pretrained, weights_only=True))
    else:
        train(model, a.steps, 2e-3, data, desc="pretrain")
        if a.pretrained:
            torch.save(model.state_dict(), a.pretrained)
    pre = bits_per_byte(model, held)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = ByteLSTM()
    teacher.load_state_dict(pretrained)
    teacher.eval()
    windows = text.numel() // 128
    prior = PriorConfig(init_std=a.init_std, init_zero_std=a.init_zero_std, pi_zero=a.pi_zero,
                        scale_to_weights=a.scale_to_weights)
    sws = swsformat.SoftWeightSharing(model, prior, dataset_size=windows, tau=a.tau,
                                      groups=None if a.groups == "shared" else a.groups)
    sws_steps = a.sws_steps or a.steps
    train(model, sws_steps, 1e-3, data, sws, desc="soft weight-sharing")
    retrained = bits_per_byte(model, held)
    done = sws.finalize_(assign=a.assign)
    snapped = bits_per_byte(model, held)
    # Logits and targets flattened to (batch * time, 256) and (batch * time,), as the losses read them.
    qat = [(x, y.reshape(-1)) for x, y in (next(data) for _ in range(max(a.qat_steps, 1)))]
    student = Flat(model)
    loss_fn = distillation_loss(Flat(teacher), a.distill, forward=student)
    sws.finetune_(qat, epochs=1, lr=3e-4, loss_fn=loss_fn, batch_size=32, progress=True)
    final = bits_per_byte(model, held)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "byte-lstm.sws"
    swsformat.encode(model, path, compress=sws.coded_names(),
                     metadata={"sws.data": "python stdlib sources, bytes"})
    loaded = ByteLSTM()
    swsformat.load_model(path, loaded)
    assert bits_per_byte(loaded, held) == final
    rep = swsformat.size_report(path)
    coded = sws.coded_names()
    kept = sum(int(model.state_dict()[n].count_nonzero()) for n in coded)
    total = sum(model.state_dict()[n].numel() for n in coded)
    # Post-training pruning and k-means (per-layer budgets, as many values), at several non-zero counts.

    def post_training(prune: float) -> dict[str, float]:
        net = ByteLSTM()
        net.load_state_dict(prune_and_cluster(pretrained, prune=prune, clusters=done.values_used))
        size = file_size(lambda f: swsformat.encode(net, f, smallest=True))
        return {"prune": prune, "bits_per_byte": bits_per_byte(net, held), "file_bytes": size}

    baseline = [post_training(q) for q in sorted({0.3, 0.5, 0.7, round(1 - kept / total, 4)})]
    reach = [b for b in baseline if b["bits_per_byte"] <= final]
    summary = {
        "command": " ".join(["python", "scripts/text_lstm.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": "byte-level LSTM (embedding 64, LSTM 256, linear 256)",
        "text": {"train_bytes": text.numel(), "held_out_bytes": held.numel(), "source": "stdlib *.py"},
        "steps": a.steps, "sws_steps": sws_steps, "qat_steps": a.qat_steps, "tau": a.tau, "groups": a.groups,
        "assign": a.assign, "pi_zero": a.pi_zero, "init_std": a.init_std, "init_zero_std": a.init_zero_std,
        "scale_to_weights": a.scale_to_weights, "distill": a.distill, "pretrained_from_cache": cached, "seed": a.seed,
        "bits_per_byte": {"pretrained": pre, "retrained": retrained, "snapped": snapped, "final": final},
        "post_training": baseline,
        "post_training_smallest_at_same_bits_per_byte": min(reach, key=lambda b: b["file_bytes"]) if reach else None,
        "nonzero_fraction": kept / total,
        "values_used": done.values_used,
        "file_bytes": rep["file_bytes"],
        "fp32_bytes": rep["fp32_bytes"],
        "compression_rate": rep["compression_rate"],
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "provenance": origin,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: summary[k] for k in ("bits_per_byte", "nonzero_fraction", "file_bytes", "compression_rate")}))


if __name__ == "__main__":
    main()
