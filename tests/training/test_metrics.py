"""Metrics against hand-computed cases and brute-force definitions; the two losses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from aat_serve.adapters.errors import ConfigError
from aat_serve.training.losses import compute_loss
from aat_serve.training.metrics import (
    accuracy,
    average_precision,
    class_report,
    compute_metrics,
    confusion_matrix,
    d_prime,
    per_class,
    roc_auc,
)


def brute_ap(s, y):
    """Mean over positives of the precision at that positive's score (ties included)."""
    pos = [i for i in range(len(y)) if y[i]]
    if not pos:
        return math.nan
    return float(np.mean([sum(y[j] for j in range(len(s)) if s[j] >= s[i])
                          / sum(1 for j in range(len(s)) if s[j] >= s[i]) for i in pos]))


def brute_auc(s, y):
    pos = [s[i] for i in range(len(y)) if y[i]]
    neg = [s[i] for i in range(len(y)) if not y[i]]
    if not pos or not neg:
        return math.nan
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_average_precision_hand_cases():
    assert average_precision(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == \
        pytest.approx((1 + 2 / 3) / 2)
    # tied scores form one threshold: P=1/2 at R=1/2, then P=2/3 at R=1
    assert average_precision(np.array([0.5, 0.5, 0.2]), np.array([1, 0, 1])) == \
        pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)
    assert average_precision(np.array([0.1, 0.9]), np.array([0, 1])) == 1.0
    assert math.isnan(average_precision(np.array([0.3, 0.2]), np.array([0, 0])))


def test_roc_auc_hand_cases():
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0])) == pytest.approx(0.75)
    assert roc_auc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert math.isnan(roc_auc(np.array([0.5, 0.4]), np.array([1, 1])))


def test_ap_and_auc_match_the_definitions_on_random_data_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = int(rng.integers(2, 30))
        s = np.round(rng.random(n), 1)  # many ties
        y = rng.random(n) < 0.4
        assert average_precision(s, y) == pytest.approx(brute_ap(s, y), nan_ok=True)
        assert roc_auc(s, y) == pytest.approx(brute_auc(s, y), nan_ok=True)


def test_masked_metrics_drop_unobserved_rows_per_class():
    rng = np.random.default_rng(1)
    scores = rng.random((30, 4))
    targets = (rng.random((30, 4)) < 0.4).astype(float)
    mask = rng.random((30, 4)) < 0.6
    ap = per_class(average_precision, scores, targets, mask.astype(float))
    for c in range(4):
        keep = mask[:, c]
        assert ap[c] == pytest.approx(brute_ap(scores[keep, c], targets[keep, c] > 0.5))
    m = compute_metrics(scores, targets, mask.astype(float))
    assert m["mAP"] == pytest.approx(np.mean(ap))
    assert m["mAP"] != pytest.approx(compute_metrics(scores, targets)["mAP"])


def test_compute_metrics_accuracy_dprime_and_undefined_classes():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.5, 0.2], [0.1, 0.2, 0.3]])
    targets = np.eye(3)[[0, 1, 1, 0]]
    m = compute_metrics(scores, targets)
    assert m["acc"] == 0.5 and accuracy(scores, targets) == 0.5
    assert m["ap_classes"] == 2  # class 2 has no positive: excluded from mAP
    ap0 = brute_ap(scores[:, 0], targets[:, 0] > 0)
    ap1 = brute_ap(scores[:, 1], targets[:, 1] > 0)
    assert m["mAP"] == pytest.approx((ap0 + ap1) / 2)
    assert d_prime(0.5) == 0.0
    assert d_prime(0.8413447460685429) == pytest.approx(math.sqrt(2), rel=1e-6)
    assert math.isnan(d_prime(float("nan"))) and d_prime(1.0) == math.inf


def test_confusion_matrix_and_class_report():
    scores = np.array([[0.9, 0.1], [0.8, 0.3], [0.2, 0.7], [0.6, 0.4]])
    targets = np.eye(2)[[0, 1, 1, 1]]
    cm = confusion_matrix(scores, targets, 2)
    assert cm.tolist() == [[1, 0], [2, 1]]
    rep = class_report(scores, targets, ["a", "b"], multi_label=False)
    assert rep[0] == {"label": "a", "precision": 1 / 3, "recall": 1.0, "f1": 0.5, "support": 1}
    assert rep[1]["precision"] == 1.0 and rep[1]["recall"] == pytest.approx(1 / 3)
    multi = class_report(scores, targets, ["a", "b"], multi_label=True)
    assert multi[1]["positives"] == 3 and multi[1]["ap"] == pytest.approx(
        brute_ap(scores[:, 1], targets[:, 1] > 0))


# -- losses -------------------------------------------------------------------------------------

def test_ce_uses_the_argmax_of_soft_targets():
    logits = torch.randn(5, 4, dtype=torch.float64)
    soft = torch.softmax(torch.randn(5, 4), dim=1)
    expected = -torch.log_softmax(logits.float(), 1)[torch.arange(5), soft.argmax(1)].mean()
    torch.testing.assert_close(compute_loss("ce", logits, soft), expected)
    assert not torch.allclose(compute_loss("bce", logits, soft), expected)


def test_bce_masked_entries_carry_no_loss_and_no_gradient():
    logits = torch.randn(3, 5, requires_grad=True)
    target = (torch.rand(3, 5) > 0.5).float()
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.float32)
    loss = compute_loss("bce", logits, target, mask)
    manual = (F.binary_cross_entropy_with_logits(logits, target, reduction="none")
              * mask).sum() / 15
    torch.testing.assert_close(loss, manual)
    loss.backward()
    assert torch.all(logits.grad[mask == 0] == 0) and torch.all(logits.grad[mask == 1] != 0)
    unmasked = compute_loss("bce", logits, target)
    torch.testing.assert_close(unmasked, F.binary_cross_entropy_with_logits(logits, target))
    assert not torch.allclose(unmasked, loss)
    with pytest.raises(ConfigError, match="ce loss cannot use a label mask"):
        compute_loss("ce", logits, target, mask)
    with pytest.raises(ConfigError, match="unknown loss 'mse'"):
        compute_loss("mse", logits, target)


# ---- against scikit-learn and scipy (the reference implementations AST's own code calls) ----

@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("tied", [False, True])
def test_ap_auc_and_d_prime_equal_scikit_learn_and_scipy(seed, tied):
    """Random scores, and scores rounded to a few levels so most of them tie: per class, our
    AP and ROC-AUC equal sklearn's, and d' equals sqrt(2) * scipy's norm.ppf(mAUC)."""
    skm = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(seed)
    n, c = 60 + 17 * seed, 7
    scores = rng.random((n, c))
    if tied:
        scores = np.round(scores * 3) / 3  # four levels: ties everywhere
    targets = (rng.random((n, c)) < 0.3).astype(np.float64)
    targets[:, 0] = 0  # a class with no positive: undefined AP and AUC (NaN), left out of means
    targets[0, 0] = 1 if seed % 2 else 0
    ours_ap = per_class(average_precision, scores, targets)
    ours_auc = per_class(roc_auc, scores, targets)
    for k in range(c):
        y = targets[:, k]
        if 0 < y.sum() < n:
            assert ours_ap[k] == pytest.approx(skm.average_precision_score(y, scores[:, k]),
                                               abs=1e-12)
            assert ours_auc[k] == pytest.approx(skm.roc_auc_score(y, scores[:, k]), abs=1e-12)
        else:
            assert math.isnan(ours_auc[k])
    m = compute_metrics(scores, targets)
    assert m["d_prime"] == pytest.approx(math.sqrt(2) * stats.norm.ppf(m["mAUC"]), abs=1e-9)
    # The differs check: sklearn is sensitive to what we compare (flipped scores differ).
    k = 1
    assert abs(skm.roc_auc_score(targets[:, k], -scores[:, k]) - ours_auc[k]) > 1e-6
