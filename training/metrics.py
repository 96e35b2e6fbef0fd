"""Evaluation metrics of AST/AAT, computed from scores and binary targets without sklearn.

- accuracy: ``argmax(score) == argmax(target)`` (AST's single-label accuracy);
- AP per class: sklearn's step-wise ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds;
  mAP is the mean over classes that have a positive;
- ROC-AUC per class: Mann-Whitney with ties counted half; mAUC the mean over defined classes;
- d': ``sqrt(2) * Phi^-1(mAUC)``, as AST's stats;
- a label mask (OpenMIC) drops the unobserved entries per class before AP and AUC.

AP, ROC-AUC and d' equal scikit-learn's ``average_precision_score``/``roc_auc_score`` and
``sqrt(2) * scipy.stats.norm.ppf`` to 1e-12 on random and heavily tied scores
(tests/training/test_metrics.py). They stay hand-written because scikit-learn and SciPy would
add ~100 MB to every install (the service included) for some 40 lines; the test keeps them honest.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any

import numpy as np


def accuracy(scores: np.ndarray, targets: np.ndarray) -> float:
    """Share of rows whose top score is the top target."""
    if len(scores) == 0:
        return float("nan")
    return float(np.mean(scores.argmax(axis=1) == targets.argmax(axis=1)))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """AP of one class (NaN when it has no positive)."""
    y = np.asarray(labels, dtype=bool)
    s = np.asarray(scores, dtype=np.float64)
    pos = int(y.sum())
    if pos == 0:
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    tp = np.cumsum(y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last row of each tied score
    tps = tp[last]
    precision = tps / (last + 1)
    recall = tps / pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), dtype=np.float64)
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0  # mean of 1-based ranks a+1..b
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC of one class (NaN unless it has both positives and negatives)."""
    y = np.asarray(labels, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = _average_ranks(np.asarray(scores, dtype=np.float64))
    return float((ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * neg))


def per_class(fn, scores: np.ndarray, targets: np.ndarray,
              mask: np.ndarray | None = None) -> np.ndarray:
    """``fn(scores[:, c], targets[:, c])`` per class, over observed rows only."""
    y = targets > 0.5
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        keep = slice(None) if mask is None else mask[:, c] > 0.5
        out[c] = fn(scores[keep, c], y[keep, c])
    return out


def d_prime(auc: float) -> float:
    if not 0.0 < auc < 1.0:
        return float("nan") if math.isnan(auc) else math.copysign(math.inf, auc - 0.5)
    return math.sqrt(2.0) * NormalDist().inv_cdf(auc)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else float("nan")


def compute_metrics(scores: np.ndarray, targets: np.ndarray,
                    mask: np.ndarray | None = None) -> dict[str, Any]:
    """``acc``, ``mAP``, ``mAUC``, ``d_prime`` and how many classes had a defined AP."""
    scores = np.asarray(scores, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.float64)
    ap = per_class(average_precision, scores, targets, mask)
    auc = per_class(roc_auc, scores, targets, mask)
    m_auc = _nanmean(auc)
    return {"acc": accuracy(scores, targets), "mAP": _nanmean(ap), "mAUC": m_auc,
            "d_prime": d_prime(m_auc), "ap_classes": int((~np.isnan(ap)).sum())}


def confusion_matrix(scores: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """``cm[true, predicted]`` counts for single-label predictions."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (targets.argmax(axis=1), scores.argmax(axis=1)), 1)
    return cm


def class_report(scores: np.ndarray, targets: np.ndarray, labels: list[str],
                 multi_label: bool, mask: np.ndarray | None = None) -> list[dict[str, Any]]:
    """Per class: precision/recall/F1/support (single-label) or AP/AUC/positives (multi)."""
    rows = []
    if multi_label:
        ap = per_class(average_precision, scores, targets, mask)
        auc = per_class(roc_auc, scores, targets, mask)
        observed = np.ones_like(targets) if mask is None else mask
        for c, name in enumerate(labels):
            pos = int(((targets[:, c] > 0.5) & (observed[:, c] > 0.5)).sum())
            rows.append({"label": name, "ap": float(ap[c]), "auc": float(auc[c]),
                         "positives": pos, "observed": int((observed[:, c] > 0.5).sum())})
        return rows
    cm = confusion_matrix(scores, targets, len(labels))
    for c, name in enumerate(labels):
        tp = int(cm[c, c])
        predicted, support = int(cm[:, c].sum()), int(cm[c].sum())
        precision = tp / predicted if predicted else float("nan")
        recall = tp / support if support else float("nan")
        if predicted and support:
            f1 = 2 * precision * recall / (precision + recall) if tp else 0.0
        else:
            f1 = float("nan")
        rows.append({"label": name, "precision": precision, "recall": recall, "f1": f1,
                     "support": support})
    return rows
