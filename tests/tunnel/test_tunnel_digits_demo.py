"""Digits demo (scikit-learn's bundled digits, offline): a deep MLP trained briefly already compresses its last
layers: the numerical rank falls towards the number of classes while the probes stay accurate.

Measured on CPU (seed 0, lr 0.01, momentum 0.9; probe ranks on the 269 test digits):
- fast variant, depth 8 / width 64 / 8 epochs: ranks [37, 44, 41, 37, 28, 29, 26, 10], probes 96-98%;
- slow variant, depth 10 / width 128 / 30 epochs: ranks [49, 65, 57, 46, 40, 32, 26, 25, 22, 9], probes 98-99%.
The assertions are looser than these numbers (other BLAS / thread counts change the training trajectory slightly).
"""

from __future__ import annotations

import pytest
import torch

from lightning_methods import ImageClassifier
from lightning_methods.datamodules import DigitsDataModule
from lightning_methods.tunnel import ProbeSettings, TunnelProber, datamodule_data
from lightning_methods.tunnel.data import image_preparer

from helpers import quiet_trainer


def digits_demo(depth: int, width: int, epochs: int, probe_epochs: int):
    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=32, seed=0)
    model = ImageClassifier("mlp", 10, backbone_kwargs={"depth": depth, "width": width},
                            optimizer=lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, weight_decay=5e-4))
    quiet_trainer(max_epochs=epochs).fit(model, dm)
    settings = ProbeSettings(max_train_samples=None, probe_epochs=probe_epochs, probe_batch_size=128)
    return TunnelProber(settings).run(model.backbone, datamodule_data(dm), image_preparer(dm, torch.device("cpu")))


def check(report, ratio: float) -> list[int]:
    rank = report.column("rank")
    assert max(rank[-3:-1]) < ratio * max(rank[:3]), rank  # the last hidden layers are compressed
    assert rank[-2] <= 3 * 10, rank  # the last hidden layer: a few times the number of classes (10)
    assert rank[-2] < rank[1], rank
    return rank


def test_digits_fast_rank_falls_in_the_last_layers(one_thread):
    report = digits_demo(depth=8, width=64, epochs=8, probe_epochs=20)
    check(report, ratio=0.8)
    assert report.summary["best_acc_id"] > 0.85


@pytest.mark.slow
def test_digits_demo_rank_falls_in_the_last_layers(one_thread, tmp_path):
    report = digits_demo(depth=10, width=128, epochs=30, probe_epochs=100)
    check(report, ratio=0.5)
    assert min(report.column("acc_id")[:-1]) > 0.9
    from lightning_methods.tunnel import plot_report

    assert plot_report(report, tmp_path / "digits_tunnel.png").stat().st_size > 1000
