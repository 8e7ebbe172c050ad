"""Post-processing after retraining: pruning masks, quantization-aware fine-tuning, the snap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from swsformat.retrain.data import Split
from swsformat.retrain.models import compressible_parameters
from swsformat.retrain.pipeline import prune_masks, quantization_aware_finetune_, quantize_model_
from swsformat.retrain.prior import Mixture

MIX = Mixture(np.array([0.0, -0.5, 0.25, 0.5]), np.array([0.05, 0.05, 0.05, 0.05]), np.array([0.9, 0.03, 0.04, 0.03]))


def _toy(seed: int = 0) -> tuple[nn.Module, Split]:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for _, p in compressible_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    x = torch.randn(512, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return model, Split(x, y)


def test_prune_masks_follow_the_assignment_rule():
    model, _ = _toy()
    masks = prune_masks(model, MIX, "nearest")
    for (_, p), m in zip(compressible_parameters(model), masks):
        w = p.detach().double().numpy()
        nearest = np.abs(w[..., None] - MIX.means).argmin(-1)
        assert m.shape == p.shape and m.dtype == torch.bool
        assert np.array_equal(m.numpy(), nearest != 0)


def test_snap_keeps_pruned_weights_exactly_zero_and_others_on_nonzero_means():
    model, _ = _toy()
    masks = prune_masks(model, MIX, "map")
    before = [p.detach().clone() for _, p in compressible_parameters(model)]
    frac, used = quantize_model_(model, MIX, masks)
    kept = total = 0
    for (_, p), m, w in zip(compressible_parameters(model), masks, before):
        assert torch.all(p[~m] == 0)
        # Each survivor lands on the closest non-zero mean (never on zero).
        expect = MIX.means[1:][np.abs(w[m].double().numpy()[:, None] - MIX.means[1:]).argmin(1)]
        assert np.array_equal(p[m].detach().double().numpy(), expect.astype(np.float32).astype(np.float64))
        kept += int(m.sum())
        total += m.numel()
    assert frac == kept / total
    assert 1 <= used <= 3


@pytest.mark.parametrize("distill", [0.0, 0.5])
def test_quantization_aware_finetune_keeps_zeros_and_beats_a_plain_snap(distill):
    import copy

    model, data = _toy()
    # Train the float net first so there is something to lose at the snap.
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = nn.functional.cross_entropy(model(data.x), data.y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    masks = prune_masks(model, MIX, "nearest")
    plain = _toy()[0]
    plain.load_state_dict(model.state_dict())
    quantize_model_(plain, MIX, masks)
    teacher = copy.deepcopy(model).eval()
    quantization_aware_finetune_(
        model, MIX, masks, data, epochs=30, lr=1e-2, batch_size=64, progress=False, teacher=teacher, distill=distill
    )
    for (_, p), m in zip(compressible_parameters(model), masks):
        assert torch.all(p[~m] == 0), "a pruned weight moved during fine-tuning"
    quantize_model_(model, MIX, masks)

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float(nn.functional.cross_entropy(m(data.x), data.y))

    assert loss(model) < loss(plain)


def test_adam_is_fused_where_torch_has_the_kernel_and_matches_the_default():
    from swsformat.retrain.train import adam

    torch.manual_seed(0)
    a = nn.Linear(20, 5)
    b = nn.Linear(20, 5)
    b.load_state_dict(a.state_dict())
    fused, plain = adam(a.parameters(), lr=1e-2), torch.optim.Adam(b.parameters(), lr=1e-2)
    assert fused.defaults["fused"] is True
    x = torch.randn(64, 20)
    for _ in range(20):
        for m, opt in ((a, fused), (b, plain)):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)
    assert not adam([torch.zeros(2, device="meta", requires_grad=True)]).defaults["fused"]
