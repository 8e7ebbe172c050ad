"""A retraining run killed with SIGKILL mid-epoch resumes to the same final weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import swsformat
from swsformat.retrain import checkpoint as checkpoint_io
from swsformat.retrain.data import Split
from swsformat.retrain.models import build_model
from swsformat.retrain.prior import PriorConfig
from swsformat.retrain.train import RetrainConfig, default_prior, retrain

SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
import swsformat
from swsformat.retrain import checkpoint as checkpoint_io
from swsformat.retrain.data import Split
from swsformat.retrain.models import build_model
from swsformat.retrain.prior import MixturePrior, PriorConfig
from swsformat.retrain.train import RetrainConfig, default_prior, retrain
mode = sys.argv[3] if len(sys.argv) > 3 else ""
if mode.startswith("kill-at-step-"):
    # Stop at a given training step (32 steps an epoch) and wait there for the parent's
    # SIGKILL: the kill lands inside an epoch however fast this machine is.
    stop, steps, original = int(mode.rsplit("-", 1)[1]), [0], MixturePrior.add_complexity_grad_
    def counted(self, weights, scale):
        steps[0] += 1
        if steps[0] == stop:
            print("stopped", flush=True)
            time.sleep(600)
        return original(self, weights, scale)
    MixturePrior.add_complexity_grad_ = counted
g = torch.Generator().manual_seed(0)
data = Split(torch.randn(2048, 1, 28, 28, generator=g), torch.randint(0, 10, (2048,), generator=g))
torch.manual_seed(0)
model = build_model("lenet300-100")
prior = default_prior(model, PriorConfig())
cfg = RetrainConfig(epochs=3, batch_size=64, train_size=60000)
retrain(model, prior, data, data.subset(256), cfg, seed=0, progress=False,
        checkpoint=sys.argv[1], resume=mode == "resume")
torch.save(model.state_dict(), sys.argv[2])
"""
STEPS_PER_EPOCH = 2048 // 64


def run(ckpt: Path, out: Path, resume: bool = False, kill_at_step: int | None = None) -> None:
    mode = ["resume"] if resume else [f"kill-at-step-{kill_at_step}"] if kill_at_step else []
    args = [sys.executable, "-c", SCRIPT, str(ckpt), str(out)] + mode
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if kill_at_step is None:
        subprocess.run(args, check=True, env=env, capture_output=True)
        return
    with subprocess.Popen(args, stdout=subprocess.PIPE, env=env) as proc:
        for line in proc.stdout:
            if line.startswith(b"stopped"):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(tmp_path):
    run(tmp_path / "a.ckpt", tmp_path / "a.pt")
    run(tmp_path / "b.ckpt", tmp_path / "b.pt", kill_at_step=STEPS_PER_EPOCH + 10)  # 10 steps into epoch 2
    assert (tmp_path / "b.ckpt").exists() and not (tmp_path / "b.pt").exists()
    assert checkpoint_io.load(tmp_path / "b.ckpt", None)["epoch"] == 1  # killed inside epoch 2
    assert [p.name for p in tmp_path.iterdir() if "sws-tmp" in p.name] == []
    run(tmp_path / "b.ckpt", tmp_path / "b.pt", resume=True)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g))
    model = build_model("lenet300-100")
    prior = default_prior(model, PriorConfig())
    ckpt = tmp_path / "run.ckpt"
    seen = []

    def poison(epoch, m, p):
        seen.append(epoch)
        if epoch == 1:
            with torch.no_grad():
                m.fc1.weight[0, 0] = float("nan")

    with pytest.raises(FloatingPointError, match="diverged in epoch 2"):
        retrain(model, prior, data, data, RetrainConfig(epochs=3, batch_size=128), progress=False,
                on_epoch=poison, checkpoint=ckpt)
    state = checkpoint_io.load(ckpt, None)
    assert state["epoch"] == 1 and torch.isfinite(state["model"]["fc1.weight"]).all()


def _one_epoch_checkpoint(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(256, 1, 28, 28, generator=g), torch.randint(0, 10, (256,), generator=g))
    torch.manual_seed(0)
    model = build_model("lenet300-100")
    prior = default_prior(model, PriorConfig())
    ckpt = tmp_path / "run.ckpt"
    retrain(model, prior, data, data, RetrainConfig(epochs=1, batch_size=128), progress=False, checkpoint=ckpt)
    return data, ckpt


def _resume(data, ckpt, epochs=2, seed=0, tau=None, weights=None):
    torch.manual_seed(0)
    model = build_model("lenet300-100")
    chosen = None if weights is None else [p for n, p in model.named_parameters() if n in weights]
    prior = default_prior(model, PriorConfig(), chosen)
    cfg = RetrainConfig(epochs=epochs, batch_size=128) if tau is None else RetrainConfig(epochs=epochs, batch_size=128, tau=tau)
    return retrain(model, prior, data, data, cfg, seed=seed, progress=False, checkpoint=ckpt, resume=True,
                   weights=chosen)


def test_resume_refuses_corrupt_foreign_and_other_settings_checkpoints(tmp_path):
    data, ckpt = _one_epoch_checkpoint(tmp_path)
    good = ckpt.read_bytes()
    # Settings differ (epochs are part of them): refused, file kept.
    with pytest.raises(swsformat.SwsCheckpointError, match="other settings"):
        _resume(data, ckpt, epochs=2)
    with pytest.raises(swsformat.SwsCheckpointError, match="other settings"):
        _resume(data, ckpt, epochs=1, seed=1)
    # Other weights under the prior (another filter_fn): each mixture would land on another tensor.
    with pytest.raises(swsformat.SwsCheckpointError, match="other settings"):
        _resume(data, ckpt, epochs=1, weights={"fc2.weight", "fc3.weight"})
    assert ckpt.read_bytes() == good
    # One flipped bit anywhere in the payload: the digest catches it.
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0x10
    ckpt.write_bytes(bytes(bad))
    with pytest.raises(swsformat.SwsCheckpointError, match="corrupt"):
        _resume(data, ckpt, epochs=1)
    assert ckpt.read_bytes() == bytes(bad)
    for junk in (b"", b"garbage", good[:100]):
        ckpt.write_bytes(junk)
        with pytest.raises(swsformat.SwsCheckpointError):
            _resume(data, ckpt, epochs=1)
    # The same settings resume; a finished retraining resumes to the later steps with no epoch run.
    ckpt.write_bytes(good)
    assert [log.epoch for log in _resume(data, ckpt, epochs=1)] == [1]
