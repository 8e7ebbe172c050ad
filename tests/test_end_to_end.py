"""Real MNIST end to end on a small budget: pretrain, compress, write, decode, evaluate."""

from __future__ import annotations

import json

import pytest
import torch

import swsformat
from swsformat.retrain import CompressConfig, PriorConfig, RetrainConfig, build_model, evaluate, pretrain
from swsformat.retrain.pipeline import compress


@pytest.mark.slow
def test_compress_lenet300_on_real_mnist(mnist, tmp_path):
    train, test = mnist
    train, test = train.subset(12000), test.subset(3000)
    torch.manual_seed(0)
    model = build_model("lenet300-100")
    pretrain(model, train, test, epochs=3, seed=0, progress=False)
    cfg = CompressConfig(
        prior=PriorConfig(init_std=0.25, init_zero_std=0.25, gamma_other=(250.0, 0.01)),
        retrain=RetrainConfig(epochs=4, tau=0.05, lr_log_precisions=1e-2, train_size=len(train)),
        finetune_epochs=1,
    )
    path = tmp_path / "lenet300.sws"
    result = compress(model, train, test, cfg, path=path, progress=False)
    # Accuracy kept (a small budget: within 1.5 points), sparsity gained, few shared values.
    assert result.quantized_error <= result.pretrained_error + 1.5, result.summary()
    assert result.nonzero_fraction < 0.25, result.summary()
    assert result.components_left <= 15
    # The file decodes to exactly the quantized model, and evaluates the same.
    loaded = swsformat.load_model(path)
    assert evaluate(loaded, test) == result.quantized_error
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    rep = swsformat.size_report(path)
    assert rep["compression_rate"] > 10
    summary = json.loads(swsformat.read_header(path)["metadata"]["sws.summary"])
    assert summary["quantized_error"] == result.quantized_error
