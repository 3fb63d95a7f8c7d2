"""Gaps found by mutation testing of the Tunnel Effect helpers: the strict rank threshold, the spectrum's sample
covariance normalisation, the tunnel-start bar taken from the best layer (not the last), and the Adam probe's default
shuffled epoch orders."""

from __future__ import annotations

import numpy as np
import torch

from lightning_methods.analysis.linear_probe import epoch_order, train_linear_probes
from lightning_methods.analysis.rank import rank_from_spectrum, spectrum
from lightning_methods.tunnel import tunnel_start

F64 = torch.float64


def test_rank_threshold_is_strict_like_matrix_rank():
    """The spec's rank is #{sigma_i > rtol * sigma_max} (``torch.linalg.matrix_rank(C, hermitian=True, rtol)``): an
    eigenvalue exactly at the bar does not count. With sigma_max = 1 the bar 1e-3 * 1.0 is the float64 number 1e-3
    itself (multiplying by 1 is exact), so the second eigenvalue sits exactly on it."""
    values = torch.tensor([1.0, 1e-3, 5e-4], dtype=F64)
    assert rank_from_spectrum(values, rtol=1e-3) == 1
    assert int(torch.linalg.matrix_rank(torch.diag(values), hermitian=True, rtol=1e-3)) == 1
    assert rank_from_spectrum(torch.tensor([1.0, 1.0000001e-3, 5e-4], dtype=F64), rtol=1e-3) == 2


def test_spectrum_is_the_sample_covariance_spectrum_in_every_mode():
    """``spectrum`` returns the eigenvalues of the centred sample covariance F_c^T F_c / (n - 1) (numpy's
    ``cov(ddof=1)``), in every mode, for a tall and a wide matrix (no subsampling). Tolerance: forming the covariance
    rounds each entry after n products (n * eps relative to lambda_max) and a backward-stable eigen solver adds
    O(d * eps * lambda_max); 10 * (n + d) * eps * lambda_max covers both."""
    g = torch.Generator().manual_seed(7)
    eps = np.finfo(np.float64).eps
    for n, d in ((12, 5), (6, 9)):
        x = torch.randn(n, d, generator=g, dtype=F64) * torch.linspace(1.0, 3.0, d, dtype=F64)
        ref = np.sort(np.linalg.eigvalsh(np.cov(x.numpy(), rowvar=False, ddof=1)))[::-1]
        k = min(n - 1, d)  # the nonzero eigenvalues (centring removes one direction)
        tol = 10 * (n + d) * eps * ref[0]
        for mode in ("covariance", "gram", "svd"):
            got = spectrum(x, mode=mode, max_columns=None).numpy()
            np.testing.assert_allclose(got[:k], ref[:k], rtol=0, atol=tol, err_msg=f"{mode} {n}x{d}")


def test_tunnel_start_bar_is_relative_to_the_best_layer_not_the_last():
    """The bar is threshold x max_l acc(l): on [0.3, 0.8, 1.0, 0.7] it is 0.95 (0.95 * 1.0 is exact), reached first at
    index 2; a bar from the last layer (0.665) would already pass index 1."""
    assert tunnel_start([0.3, 0.8, 1.0, 0.7], 0.95) == 2
    assert tunnel_start([0.3, 0.8, 1.0, 0.7], 0.8) == 1  # bar 0.8 (0.8 * 1.0 exact): 0.8 qualifies


def test_adam_probe_shuffles_with_the_seeded_epoch_orders_by_default(one_thread):
    """Without ``epoch_orders`` the Adam probe visits the samples in ``epoch_order(n, seed, epoch)`` (a shuffle per
    epoch, a function of (seed, epoch) only): the same float64 weights, bit for bit, as passing those orders
    explicitly (same operations in the same order), and not those of unshuffled batches."""
    g = torch.Generator().manual_seed(11)
    n, epochs, seed = 96, 3, 4
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 6, generator=g, dtype=F64) + y[:, None].to(F64)
    kw = dict(solver="adam", epochs=epochs, batch_size=32, seed=seed, dtype=F64)
    default = train_linear_probes({"f": x}, y, 3, **kw)["f"]
    orders = [epoch_order(n, seed, e) for e in range(epochs)]
    assert not torch.equal(orders[0], torch.arange(n)) and not torch.equal(orders[0], orders[1])
    explicit = train_linear_probes({"f": x}, y, 3, epoch_orders=orders, **kw)["f"]
    assert torch.equal(default.weight, explicit.weight) and torch.equal(default.bias, explicit.bias)
    plain = train_linear_probes({"f": x}, y, 3, epoch_orders=[torch.arange(n)] * epochs, **kw)["f"]
    assert not torch.equal(default.weight, plain.weight)


def test_report_ood_peak_ties_go_to_the_earliest_layer():
    """The report's OOD peak is the layer with the best OOD probe accuracy, ties to the earliest (as the tunnel start
    and the elbow; accuracies on a small test set tie often): OOD accuracies [0.5, 0.7, 0.7, 0.6] peak at layer 2
    (1-based), and the OOD accuracy retained is 100 * 0.6 / 0.7."""
    from lightning_methods.analysis.features import ProbePoint
    from lightning_methods.tunnel.data import ProbeData
    from lightning_methods.tunnel.probe import TunnelProber

    points = [ProbePoint(f"l{i}", f"m{i}") for i in range(4)]
    acc_id, acc_ood = [0.4, 0.8, 0.9, 0.9], [0.5, 0.7, 0.7, 0.6]
    results = {p.name: {"acc_id": a, "train_acc_id": a, "acc_ood": o, "train_acc_ood": o, "rank": 3}
               for p, a, o in zip(points, acc_id, acc_ood)}
    ood = ProbeData("ood", None, None, 2, classes=[0, 1])
    report = TunnelProber()._report(points, {p.name: 8 for p in points}, results,
                                    id_data=ProbeData("id", None, None, 3), ood_data=ood, stats={}, est=0, meta=None)
    s = report.summary
    assert s["ood_peak_layer"] == 2 and s["ood_peak_name"] == "l1"
    assert s["tunnel_start_layer"] == 3  # bar 0.95 * 0.9 = 0.855: first reached at index 2
    assert abs(s["ood_retained_pct"] - 100 * 0.6 / 0.7) <= 4 * np.finfo(np.float64).eps * 100  # a few roundings
