"""Multi-label diagnosis metrics (AUROC, AUPRC, F1 at chosen thresholds) with missing labels.

Labels come from :func:`medfuse_core.data.labels.evaluation_targets`: 1/0, NaN where not scored
(uncertain; blank under ``blank_policy=ignore``). Each label is scored on its own non-NaN
entries, and only where both classes are present (so "No Finding" is scored under
``blank_policy=negative`` and skipped under ``ignore``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import average_precision_score, f1_score, precision_recall_curve, roc_auc_score


def _valid(labels: np.ndarray, j: int) -> np.ndarray:
    return ~np.isnan(labels[:, j])


NEVER_FLAG = 2.0  # a threshold no probability reaches: the label is never flagged


def choose_thresholds(probs: np.ndarray, labels: np.ndarray, min_auroc: float | None = None) -> np.ndarray:
    """Per-label threshold maximising F1 on (validation) data; 0.5 where a label has no positives.
    With ``min_auroc``, a label scored under that AUROC gets :data:`NEVER_FLAG` instead: the
    F1-best cut of a score without signal flags nearly every row."""
    thresholds = np.full(probs.shape[1], 0.5, dtype=np.float64)
    for j in range(probs.shape[1]):
        m = _valid(labels, j)
        y, p = labels[m, j], probs[m, j]
        if y.size == 0 or y.sum() == 0:
            continue
        if min_auroc is not None and y.sum() < y.size and roc_auc_score(y, p) < min_auroc:
            thresholds[j] = NEVER_FLAG
            continue
        precision, recall, cuts = precision_recall_curve(y, p)
        f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
        best = int(np.argmax(f1[:-1])) if len(cuts) else 0
        if len(cuts):
            thresholds[j] = float(cuts[best])
    return thresholds


def multilabel_metrics(probs: np.ndarray, labels: np.ndarray, label_names: Sequence[str],
                       thresholds: np.ndarray | None = None) -> dict:
    """AUROC / AUPRC per label with both classes present, their macro means, and F1 at ``thresholds``."""
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    thresholds = np.full(probs.shape[1], 0.5) if thresholds is None else np.asarray(thresholds)
    auroc, auprc, f1, counts = {}, {}, {}, {}
    for j, name in enumerate(label_names):
        m = _valid(labels, j)
        y, p = labels[m, j], probs[m, j]
        n_pos = int(y.sum())
        counts[name] = {"positive": n_pos, "negative": int(y.size - n_pos)}
        if 0 < n_pos < y.size:
            auroc[name] = float(roc_auc_score(y, p))
            auprc[name] = float(average_precision_score(y, p))
            f1[name] = float(f1_score(y, p >= thresholds[j], zero_division=0))
    return {
        "auroc": auroc,
        "auroc_macro": float(np.mean(list(auroc.values()))) if auroc else float("nan"),
        "auprc": auprc,
        "auprc_macro": float(np.mean(list(auprc.values()))) if auprc else float("nan"),
        "f1": f1,
        "f1_macro": float(np.mean(list(f1.values()))) if f1 else float("nan"),
        "thresholds": {name: float(t) for name, t in zip(label_names, thresholds)},
        "counts": counts,
        "n": int(len(probs)),
    }
