"""A short real experiment on the shared CIFAR-10 (JPEG q75 copy), when it is present."""

from __future__ import annotations

import pytest

from src.config import PROJECT_ROOT
from src.experiment import run

CIFAR_JPG = PROJECT_ROOT.parent / "shared" / "datasets" / "cifar10-jpg.tar.gz"


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPG.exists(), reason=f"{CIFAR_JPG} not present")
def test_short_real_cifar10_experiment(make_cfg):
    cfg = make_cfg(f"data.path={CIFAR_JPG}", "data.limit_train=10000", "model=resnet8",
                   "train.epochs=2", "train.batch_size=128", "train.verbose=2",
                   "prune=flat", "prune.rate=0.5", "quant=int8", tiny=False)
    metrics = run(cfg)
    assert metrics["tflite_accuracy"] > 0.25  # chance is 0.10
    assert abs(metrics["sparsity_global"] - 0.5) < 0.005
