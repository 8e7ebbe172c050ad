"""The main job (``sws compress``) end to end on real MNIST with a tiny budget, and ``sws eval``
of the file it writes."""

from __future__ import annotations

import json

import pytest
import torch

import swsformat
from swsformat.cli import main
from swsformat.retrain import data as data_mod
from swsformat.retrain import reproduce
from swsformat.retrain import train as train_mod

# Settings that keep weights after two retraining epochs (the defaults need 12-15 epochs and
# refuse a collapsed model); the job's logic, not its accuracy, is under test.
TINY = {"qat_epochs": 1, "finetune_epochs": 1, "retrain.tau": 0.002, "prior.pi_zero": 0.9, "assign": "nearest"}


@pytest.mark.slow
def test_run_writes_file_json_and_summaries(small_mnist, tmp_path, capsys):
    out = tmp_path / "net.sws"
    res = reproduce.run("lenet300-100", "mnist", out, epochs=2, pretrain_epochs=1, overrides=TINY,
                        checkpoint=str(tmp_path / "net.ckpt"))
    record = json.loads((tmp_path / "net.json").read_text())
    assert record == json.loads(json.dumps(res))
    assert record["file_bytes"] == out.stat().st_size
    assert record["pretrain_epochs"] == 1 and len(record["retrain_test_error_per_epoch"]) == 2
    assert record["config"]["retrain"]["tau"] == 0.002 and record["config"]["qat_epochs"] == 1
    prov = record["provenance"]
    assert prov["threads"]["torch"] == torch.get_num_threads() and prov["versions"]["torch"] == torch.__version__
    assert prov["commit"] is None or len(prov["commit"]) == 40
    # The file decodes to a model with the recorded error; the checkpoints are gone.
    model = swsformat.load_model(out)
    _, test = data_mod.load("mnist", normalization="standard")
    assert train_mod.evaluate(model, test) == record["decoded_test_error"]
    assert not (tmp_path / "net.ckpt").exists() and not (tmp_path / "net.ckpt.pretrain").exists()
    err = capsys.readouterr().err
    assert "sws compress: lenet300-100 on mnist (3,000 train / 1,000 test" in err
    assert f"wrote {out} ({record['file_bytes']:,} bytes), {tmp_path / 'net.json'}" in err
    assert f"sws eval {out}" in err
    # The input the model expects travels in the file.
    spec = swsformat.open(out).input_spec()
    assert spec == data_mod.input_spec("mnist", "standard")
    # sws eval reads the normalization from the file and reports the same error.
    assert main(["eval", str(out)]) == 0
    assert f"test error {record['decoded_test_error']:.2f}% on mnist (1000 images, normalization standard)" in capsys.readouterr().out


def test_pretraining_resumes_to_the_same_weights(small_mnist, tmp_path, monkeypatch):
    train, test = (s.subset(1000) for s in small_mnist)

    def fresh():
        torch.manual_seed(0)
        return swsformat.retrain.build_model("lenet300-100")

    whole = fresh()
    train_mod.pretrain(whole, train, test, epochs=3, progress=False)
    calls = []
    evaluate = train_mod.evaluate

    def interrupt_in_epoch_two(model, split, batch_size=2000):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(model, split, batch_size)

    ckpt = tmp_path / "p.ckpt"
    monkeypatch.setattr(train_mod, "evaluate", interrupt_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train_mod.pretrain(fresh(), train, test, epochs=3, progress=False, checkpoint=ckpt)
    monkeypatch.setattr(train_mod, "evaluate", evaluate)
    resumed = fresh()
    logs = train_mod.pretrain(resumed, train, test, epochs=3, progress=False, checkpoint=ckpt, resume=True)
    assert [log.epoch for log in logs] == [1, 2, 3]
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(swsformat.SwsCheckpointError):
        train_mod.pretrain(fresh(), train, test, epochs=4, progress=False, checkpoint=ckpt, resume=True)


def test_resume_flag_accepts_a_pretraining_checkpoint(tmp_path, capsys):
    out = tmp_path / "x.sws"
    assert main(["compress", "--model", "lenet300-100", "-o", str(out), "--resume"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err


def _cli_worker(rank: int, world: int, port: int, folder: str, mnist_root: str) -> None:
    """One torchrun process of ``sws compress --distributed``, on the small MNIST."""
    import os

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "XDG_CACHE_HOME": f"{folder}/cache"})
    torch.set_num_threads(1)

    def load(name="mnist", root=None, download=True, normalization="unit"):
        full = data_mod.load.__wrapped__(name, mnist_root, download=False, normalization=normalization)
        return full[0].subset(3000), full[1].subset(1000)

    load.__wrapped__ = data_mod.load
    data_mod.load = load
    settings = [f"{k}={v}" for k, v in TINY.items()]
    main(["compress", "--model", "lenet300-100", "-o", f"{folder}/net.sws", "--epochs", "2", "--pretrain-epochs", "1",
          "--quiet", "--distributed", *(x for s in settings for x in ("--set", s))])


@pytest.mark.slow
def test_compress_command_under_torchrun_processes(small_mnist, tmp_path, capsys):
    """``sws compress --distributed`` as torchrun starts it (RANK/WORLD_SIZE/MASTER_* in the
    environment), two processes: rank 0 pretrains, both retrain through DDP (distillation
    included), rank 0 alone writes the file and its JSON, nothing is left to resume, and the
    file holds the model both ranks ended with (the command checks that itself)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_cli_worker, args=(2, port, str(tmp_path), str(data_mod.locate("mnist", None))), nprocs=2)
    record = json.loads((tmp_path / "net.json").read_text())
    assert record["processes"] == 2 and record["config"]["qat_distill"] == 0.5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "net.json", "net.sws"]
    _, test = data_mod.load("mnist", normalization=swsformat.open(tmp_path / "net.sws").input_spec()["normalization"])
    assert train_mod.evaluate(swsformat.load_model(tmp_path / "net.sws"), test) == record["decoded_test_error"]
    assert main(["compress", "--model", "lenet300-100", "-o", str(tmp_path / "x.sws"), "--distributed"]) == 2
    assert "runs under torchrun" in capsys.readouterr().err
