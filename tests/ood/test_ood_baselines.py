"""MSP, energy, Mahalanobis and kNN against golden values computed with OpenOOD's postprocessor procedures
(mds: sklearn EmpiricalCovariance of class-centred features; knn: squared L2 to the k-th neighbour, as faiss
IndexFlatL2 returns it, after OpenOOD's normaliser) on a fixed float32 toy input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_methods.ood.baselines import KNN, Mahalanobis, energy, msp

X = torch.tensor([[np.sin(1.7 * i * j + 0.3 * i + j**2) for j in range(4)] for i in range(30)], dtype=torch.float32)
Y = torch.arange(30) % 3
TEST = torch.tensor([[np.cos(0.3 * i + 2 * j) for j in range(4)] for i in range(5)], dtype=torch.float32)
GOLDEN = {
    "mds": [-3.58611798286438, -3.590350866317749, -3.4395804405212402, -3.1264867782592773, -2.78737735748291],
    "knn": [-0.7027157545089722, -0.8753616809844971, -0.6911806464195251, -0.8462575078010559, -0.9073539972305298],
    "ebo": [3.64640474319458, 3.6396830081939697, 3.4006741046905518, 2.9864230155944824, 2.5875024795532227],
    "msp": [0.5239260196685791, 0.5272359251976013, 0.5769634246826172, 0.5831867456436157, 0.4665226936340332],
}


def test_baselines_match_openood_procedures():
    # OpenOOD computes in float32; the package in float64: agreement to float32 precision
    torch.testing.assert_close(Mahalanobis(X, Y)(TEST), torch.tensor(GOLDEN["mds"], dtype=torch.float64),
                               rtol=2e-5, atol=0)
    torch.testing.assert_close(KNN(X, k=5)(TEST), torch.tensor(GOLDEN["knn"], dtype=torch.float64), rtol=1e-5, atol=0)
    torch.testing.assert_close(energy(TEST * 3), torch.tensor(GOLDEN["ebo"], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(msp(TEST * 3), torch.tensor(GOLDEN["msp"], dtype=torch.float64), rtol=1e-6, atol=0)


def test_baseline_properties_and_errors():
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert energy(logits, 2.0).tolist() == pytest.approx([2 * np.log(np.exp(1) + 1), 2 * np.log(2)])
    knn = KNN(X, k=1)
    assert torch.allclose(knn(X[:4]), torch.zeros(4, dtype=torch.float64), atol=1e-12)  # own neighbour
    maha = Mahalanobis(X, Y)
    assert (maha(maha.means.float()) > maha(maha.means.float() + 3)).all()  # class means are most ID-like
    assert maha.num_parameters == 3 * 4 + 16 and knn.num_parameters == 30 * 4
    with pytest.raises(ValueError, match="1 <= k"):
        KNN(X, k=31)
    with pytest.raises(ValueError, match="without ID-train samples"):
        Mahalanobis(X, torch.where(Y == 1, 2, Y))
