"""Soft weight-sharing of a small GPT-style language model, trained and compressed with DDP.

A byte-level decoder-only transformer (tied input and output embeddings, as GPT-2) learns the
Python standard library's sources (every tenth file held out). Run it under ``torchrun``: every
process trains on its own random windows, ``DistributedDataParallel`` averages the gradients,
and ``SoftWeightSharing`` (built on the unwrapped module, ``dataset_size`` = the whole training
text's windows) adds the prior's gradient after ``backward`` on every rank. Rank 0 writes the
``.sws`` file and ``results/text-gpt/summary.json`` (held-out bits per byte and perplexity
before and after, non-zero %, bits per weight, file sizes against safetensors and the
post-training path).

    torchrun --nproc-per-node 2 scripts/text_gpt.py --layers 3 --batch 4 --steps 1500 --sws-steps 800 --qat-steps 300
    torchrun --nproc-per-node 2 scripts/text_gpt.py --steps 20 --out /tmp/g   # a smoke run

The committed ``results/text-gpt`` came from the first command at 334af08 (with ``--out``), 11
minutes on 2 cores: 2.74 -> 2.84 bits per byte, 11.9% of the weights non-zero, 261,976 bytes.
With the prior's settings in absolute units (``--absolute``, LeNet scale) the zero component
takes every weight of this model (initialised at std 0.02) and ``finalize_`` refuses.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from _shared import corpus, file_size
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

import swsformat
from swsformat.provenance import provenance
from swsformat.quantize import prune_and_cluster
from swsformat.retrain import PriorConfig
from swsformat.retrain.train import cosine_schedule

ROOT = Path(__file__).resolve().parent.parent


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteGPT(nn.Module):
    """GPT-2's layout at toy size: learned positions, pre-norm blocks, a final norm, the output
    layer tied to the token embedding."""

    def __init__(self, d: int = 256, layers: int = 4, heads: int = 4, context: int = 128) -> None:
        super().__init__()
        self.tok = nn.Embedding(256, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, 256, bias=False)
        self.head.weight = self.tok.weight
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        return self.head(self.ln(self.blocks(h)))


def windows(text: torch.Tensor, seq: int, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, text.numel() - seq - 1, (batch,), generator=gen)
        chunk = text[starts[:, None] + torch.arange(seq + 1)]
        yield chunk[:, :-1], chunk[:, 1:]


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, text: torch.Tensor, seq: int = 128) -> float:
    was = model.training
    model.eval()
    n = (text.numel() - 1) // seq * seq
    x, y = text[:n].view(-1, seq), text[1 : n + 1].view(-1, seq)
    total = sum(float(lm_loss(model, x[i : i + 64], y[i : i + 64])) * x[i : i + 64].numel() for i in range(0, len(x), 64))
    model.train(was)
    return total / x.numel() / math.log(2)


def train(ddp: nn.Module, model: nn.Module, steps: int, lr: float, data, sws=None, desc: str = "train",
          lr_log_precisions: float = 1e-2) -> None:
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": lr, "weight_decay": 0.0},
                             *(sws.param_groups(lr_log_precisions=lr_log_precisions) if sws else [])])
    sched = cosine_schedule(opt, steps)
    bar = tqdm(range(steps), desc=desc, disable=dist.get_rank() != 0)
    for step in bar:
        if sws is not None and step % 200 == 0:
            sws.new_epoch()
        x, y = next(data)
        loss = lm_loss(ddp, x, y)  # DDP averages the gradient over the ranks in backward
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        extra = sws.add_complexity_grad_() if sws is not None else 0.0  # the same on every rank
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", complexity=f"{extra:.3g}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1500, help="pretraining steps; retraining takes as many")
    p.add_argument("--sws-steps", type=int, default=None, help="retraining steps (default: as --steps)")
    p.add_argument("--qat-steps", type=int, default=400)
    p.add_argument("--tau", type=float, default=0.02)
    p.add_argument("--groups", choices=("shared", "layer"), default="layer", help="one mixture, or one per weight")
    p.add_argument("--absolute", action="store_true",
                   help="read the prior's settings as weight values (LeNet scale) instead of scaling them to "
                        "each group's weights (PriorConfig.scale_to_weights)")
    p.add_argument("--init-std", type=float, default=0.05,
                   help="starting std of the non-zero components (prior units: RMS 0.05 = the weights' own)")
    p.add_argument("--init-zero-std", type=float, default=0.05, help="the zero component's starting std")
    p.add_argument("--assign", choices=("map", "nearest"), default="nearest",
                   help="snap rule: nearest mean (measured better here) or the paper's most probable component")
    p.add_argument("--pi-zero", type=float, default=0.9, help="the zero component's mixing proportion")
    p.add_argument("--lr-log-precisions", type=float, default=3e-2,
                   help="the mixture's precisions learn fast enough to narrow within a short retraining")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="windows per process and step")
    p.add_argument("--bytes", type=int, default=3_000_000)
    p.add_argument("--pretrained", default=None,
                   help="a state_dict file: loaded if it exists, else written by rank 0 after pretraining")
    p.add_argument("--out", default=str(ROOT / "results" / "text-gpt"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    origin = provenance(ROOT)
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)  # the same initial weights on every rank
    text, held = corpus(a.bytes)
    data = windows(text, 128, a.batch, torch.Generator().manual_seed(a.seed * 1000 + rank))
    model = ByteGPT(a.width, a.layers)
    ddp = nn.parallel.DistributedDataParallel(model)
    cached = bool(a.pretrained) and Path(a.pretrained).exists()
    if cached:
        model.load_state_dict(torch.load(a.pretrained, weights_only=True))
    else:
        train(ddp, model, a.steps, 1e-3, data, desc="pretrain")
        if a.pretrained and rank == 0:
            torch.save(model.state_dict(), a.pretrained)
    pre = bits_per_byte(model, held)
    pretrained = {k: v.clone() for k, v in model.state_dict().items()}

    prior = PriorConfig(init_std=a.init_std, init_zero_std=a.init_zero_std, pi_zero=a.pi_zero,
                        scale_to_weights=not a.absolute)
    sws = swsformat.SoftWeightSharing(model, prior, dataset_size=text.numel() // 128, tau=a.tau,
                                      groups=None if a.groups == "shared" else a.groups)
    sws_steps = a.sws_steps or a.steps
    train(ddp, model, sws_steps, 5e-4, data, sws, desc="soft weight-sharing", lr_log_precisions=a.lr_log_precisions)
    retrained = bits_per_byte(model, held)
    done = sws.finalize_(assign=a.assign)
    snapped = bits_per_byte(model, held)
    # The fine-tune's loss calls the DDP wrapper, so its gradients are averaged too.
    sws.finetune_([next(data) for _ in range(a.qat_steps)], epochs=1, lr=2e-4,
                  loss_fn=lambda m, x, y: lm_loss(ddp, x, y), progress=rank == 0)
    final = bits_per_byte(model, held)
    weights = torch.cat([w.detach().flatten() for w in sws.weights])
    gathered = [torch.empty_like(weights) for _ in range(world)]
    dist.all_gather(gathered, weights)
    same = all(torch.equal(g, gathered[0]) for g in gathered)
    if rank == 0:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / "byte-gpt.sws"
        swsformat.encode(model, path, compress=sws.coded_names(), metadata={"sws.data": "python stdlib sources, bytes"})
        loaded = ByteGPT(a.width, a.layers)
        swsformat.load_model(path, loaded)
        decoded = bits_per_byte(loaded, held)
        if decoded != final:
            raise SystemExit(f"the decoded file gives {decoded} bits per byte, the model in memory {final}")
        sd = model.state_dict()
        kept = sum(int(sd[n].count_nonzero()) for n in sws.coded_names() if n != "head.weight")
        total = sum(w.numel() for w in sws.weights)

        def post_training(prune: float) -> dict[str, float]:
            net = ByteGPT(a.width, a.layers)
            net.load_state_dict(prune_and_cluster(pretrained, prune=prune, clusters=done.values_used))
            size = file_size(lambda f: swsformat.encode(net, f, smallest=True))
            return {"prune": prune, "bits_per_byte": bits_per_byte(net, held), "file_bytes": size}

        baseline = [post_training(q) for q in sorted({0.3, 0.5, 0.7, round(1 - kept / total, 4)})]
        reach = [b for b in baseline if b["bits_per_byte"] <= final]
        from safetensors.torch import save_model

        fresh = ByteGPT(a.width, a.layers)
        fresh.load_state_dict(pretrained)
        fp32 = file_size(lambda f: save_model(fresh, str(f)))
        fp16 = file_size(lambda f: save_model(fresh.half(), str(f)))
        rep = swsformat.size_report(path)
        back = swsformat.load_state_dict(path)  # an alias comes back as the same tensor object
        summary = {
            "command": " ".join(["torchrun", f"--nproc-per-node {world}", "scripts/text_gpt.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "model": f"byte-level GPT: width {a.width}, {a.layers} pre-norm blocks, 4 heads, context 128, output "
                     f"tied to the token embedding; {sum(q.numel() for q in model.parameters())} parameters, "
                     f"{total} under the prior ({len(sws.weights)} tensors)",
            "text": {"train_bytes": text.numel(), "held_out_bytes": held.numel(), "source": "stdlib *.py"},
            "processes": world, "threads_per_process": torch.get_num_threads(), "backend": "gloo, DDP",
            "steps": a.steps, "sws_steps": sws_steps, "qat_steps": a.qat_steps, "batch_per_process": a.batch, "tau": a.tau, "pi_zero": a.pi_zero, "assign": a.assign,
            "lr_log_precisions": a.lr_log_precisions,
            "pretrained_from_cache": cached, "scale_to_weights": not a.absolute,
            "groups": a.groups, "init_std": a.init_std, "init_zero_std": a.init_zero_std, "seed": a.seed,
            "bits_per_byte": {"pretrained": pre, "retrained": retrained, "snapped": snapped, "final": final,
                              "decoded_file": decoded},
            "perplexity_per_byte": {"pretrained": 2**pre, "final": 2**final},
            "ranks_identical": same,
            "nonzero_fraction": kept / total,
            "values_used": done.values_used,
            "bits_per_coded_weight": 8 * rep["file_bytes"] / total,
            "file_bytes": rep["file_bytes"],
            "tied_stored_once": back["head.weight"] is back["tok.weight"],
            "safetensors_fp32_bytes": fp32,
            "safetensors_fp16_bytes": fp16,
            "rate_vs_safetensors_fp32": fp32 / rep["file_bytes"],
            "post_training": baseline,
            "post_training_smallest_at_same_bits_per_byte": min(reach, key=lambda b: b["file_bytes"]) if reach else None,
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "provenance": origin,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps({k: summary[k] for k in ("bits_per_byte", "nonzero_fraction", "file_bytes",
                                                  "rate_vs_safetensors_fp32", "ranks_identical")}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
