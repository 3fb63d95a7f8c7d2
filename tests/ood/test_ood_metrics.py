"""OpenOOD metric conventions, pinned against golden values produced by OpenOOD's own ``metrics.py`` at the tagged
v1.5 release (ID positive) and at its current HEAD (OOD positive since August 2023)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from lightning_methods.ood.metrics import aupr, auroc, fpr_at_tpr, group_means, ood_metrics

TOY_ID = np.arange(1, 21, dtype=float)
TOY_OOD = np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 0.1, 0.2, 19.5, 0.3])
TIES_ID = np.array([5, 3, 3, 1, 1, 0, 0, 0, 1, 4, 3, 5, 3, 3, 5, 4, 3, 3, 3, 5, 1, 4, 4, 0, 2, 5, 3, 0, 4, 4, 5, 1,
                    0, 5, 0, 3, 0], dtype=float)
TIES_OOD = np.array([-1, 0, 0, 0, -2, -2, -2, -2, 2, 1, 1, -1, 1, 2, 0, 0, 3, 2, 3, 0, 2, 3, 1], dtype=float)

# (fpr95 v1.5, fpr95 head, auroc, aupr_in, aupr_out) from OpenOOD's compute_all_metrics (tag v1.5 / HEAD 3c35632)
GOLDEN = {
    "toy": (0.5, 0.95, 0.8300000000000001, 0.8498900216505126, 0.7845906966596621),
    "ties": (0.7391304347826086, 0.6486486486486487, 0.7920094007050529, 0.8821947567915309, 0.7391201145359736),
}


def test_fpr95_toy_case_by_hand():
    # 95% of 20 ID scores are kept above the 19th largest ID confidence (2.0); OOD scores >= 2.0: 2.5, 3.5, 4.5,
    # 5.5 and 19.5 -> 5 of 10
    assert fpr_at_tpr(TOY_ID, TOY_OOD) == 0.5
    # the "OOD positive" convention: flag 95% of the OOD set (threshold at its 10th smallest confidence, 19.5);
    # ID confidences <= 19.5 are flagged: 19 of 20
    assert fpr_at_tpr(TOY_ID, TOY_OOD, convention="head") == 0.95


def test_fpr95_counts_ood_ties_at_the_threshold_as_accepted():
    """OpenOOD reads FPR@95 off scikit-learn's ROC curve, where a score equal to the threshold is accepted: with ID
    1..20 the threshold is the 19th largest ID confidence, 2.0, and the OOD confidences 2.0, 2.0 and 10.0 are accepted
    (3 of 10), not only the one strictly above it (a strict ">" would give 0.1). EncMin2L's p-values are discrete, so
    such ties occur."""
    ood = np.array([2.0, 2.0, 10.0, 0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7])
    assert fpr_at_tpr(TOY_ID, ood) == 0.3
    # "head" (OOD positive): flagging 95% of the 10 OOD means all of them, conf <= 10.0, which flags ID 1..10
    assert fpr_at_tpr(TOY_ID, ood, convention="head") == 0.5


@pytest.mark.parametrize("case", ["toy", "ties"])
def test_matches_openood_golden_values(case):
    cid, cood = {"toy": (TOY_ID, TOY_OOD), "ties": (TIES_ID, TIES_OOD)}[case]
    fpr15, fpr_head, au, ain, aout = GOLDEN[case]
    m = ood_metrics(cid, cood)
    assert m["fpr95"] == pytest.approx(fpr15, abs=1e-15)
    assert m["auroc"] == pytest.approx(au, abs=1e-15)
    assert m["aupr_in"] == pytest.approx(ain, abs=1e-15)
    assert m["aupr_out"] == pytest.approx(aout, abs=1e-15)
    assert ood_metrics(cid, cood, convention="head")["fpr95"] == pytest.approx(fpr_head, abs=1e-15)


def test_auroc_properties_and_torchmetrics_agreement():
    assert auroc([2.0, 3.0, 4.0], [0.0, 1.0]) == 1.0
    assert auroc([0.0, 1.0], [2.0, 3.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5
    rng = np.random.default_rng(0)
    a, b = rng.normal(1, 1, 300), rng.normal(0, 1, 200)
    expected = binary_auroc(torch.tensor(np.r_[a, b]), torch.tensor(np.r_[np.ones(300), np.zeros(200)]).long())
    assert auroc(a, b) == pytest.approx(float(expected), abs=1e-6)
    # Mann-Whitney form with ties counted one half
    mw = np.mean((TIES_ID[:, None] > TIES_OOD[None]) + 0.5 * (TIES_ID[:, None] == TIES_OOD[None]))
    assert auroc(TIES_ID, TIES_OOD) == pytest.approx(mw, abs=1e-15)
    # invariant to monotone maps, AUPR-Out is AUPR of the OOD class
    assert auroc(np.exp(a), np.exp(b)) == pytest.approx(auroc(a, b), abs=1e-15)
    assert ood_metrics(a, b)["aupr_out"] == aupr(-b, -a)


def test_group_means_and_bad_input():
    per = {"c10": {"auroc": 0.8, "fpr95": 0.5}, "tin": {"auroc": 0.9, "fpr95": 0.3}, "svhn": {"auroc": 1.0,
                                                                                           "fpr95": 0.0}}
    out = group_means(per, {"c10": "near", "tin": "near", "svhn": "far"})
    assert out["near"] == pytest.approx({"auroc": 0.85, "fpr95": 0.4}) and out["far"]["auroc"] == 1.0
    with pytest.raises(KeyError, match="mnist"):
        group_means(per, {"mnist": "far"})
    with pytest.raises(ValueError, match="ID and OOD"):
        ood_metrics([], [1.0])
    with pytest.raises(ValueError, match="convention"):
        fpr_at_tpr([1.0], [0.0], convention="v2")
