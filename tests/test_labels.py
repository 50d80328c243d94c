"""Label policies (uncertain, blank), batch targets for unlabelled rows, and the diagnosis metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from medfuse_core.data.batching import make_batch
from medfuse_core.config import ConfigError, DataConfig
from medfuse_core.experiment import load_config
from medfuse_core.data.labels import (BLANK_POLICIES, CHEXPERT_LABELS, UNCERTAIN_POLICIES, evaluation_targets,
                                 training_targets)
from medfuse_core.evaluation.metrics import choose_thresholds, multilabel_metrics
from medfuse_core.data.records import pixels_to_bytes

nan = math.nan
RAW = np.array([[1.0, 0.0, -1.0, nan]], dtype=np.float32)  # positive, negated, uncertain, blank


def test_policies_are_exported_and_in_the_config():
    assert BLANK_POLICIES == ("negative", "ignore") and UNCERTAIN_POLICIES == ("ignore", "ones", "zeros")
    assert DataConfig().blank_policy == "negative" and DataConfig().allow_resize is False
    assert DataConfig(blank_policy="ignore").blank_policy == "ignore"
    with pytest.raises(ConfigError, match="data.blank_policy"):
        load_config(None, ["data.blank_policy=zero"])


@pytest.mark.parametrize("uncertain, blank, targets, weights", [
    ("ignore", "negative", [1, 0, 0, 0], [1, 1, 0, 1]),
    ("ignore", "ignore", [1, 0, 0, 0], [1, 1, 0, 0]),
    ("ones", "negative", [1, 0, 1, 0], [1, 1, 1, 1]),
    ("zeros", "ignore", [1, 0, 0, 0], [1, 1, 1, 0]),
])
def test_training_targets(uncertain, blank, targets, weights):
    t, w = training_targets(RAW, uncertain, blank)
    assert t.dtype == w.dtype == np.float32
    assert t.tolist() == [targets] and w.tolist() == [weights]


def test_training_targets_default_is_blank_negative():
    t, w = training_targets(RAW, "ignore")
    assert w.tolist() == [[1, 1, 0, 1]] and t[0, 3] == 0.0


def test_evaluation_targets():
    neg = evaluation_targets(RAW)  # default: blank_policy="negative"
    assert neg[0, :2].tolist() == [1.0, 0.0] and np.isnan(neg[0, 2]) and neg[0, 3] == 0.0
    ign = evaluation_targets(RAW, "ignore")
    assert ign[0, :2].tolist() == [1.0, 0.0] and np.isnan(ign[0, 2]) and np.isnan(ign[0, 3])


def test_bad_policies_and_values_are_refused():
    with pytest.raises(ValueError, match="blank-label policy"):
        training_targets(RAW, "ignore", "zero")
    with pytest.raises(ValueError, match="uncertain-label policy"):
        training_targets(RAW, "maybe")
    with pytest.raises(ValueError, match="blank-label policy"):
        evaluation_targets(RAW, "zero")
    with pytest.raises(ValueError, match="1, 0, -1 or NaN"):
        training_targets(np.array([[2.0]]), "ignore")


def _no_finding_column(n_normal=3, n_abnormal=3) -> np.ndarray:
    """MIMIC's "No Finding": 1.0 on normal studies, blank otherwise (never 0.0)."""
    return np.array([[1.0]] * n_normal + [[nan]] * n_abnormal, dtype=np.float32)


def test_no_finding_is_trained_and_scored_under_negative():
    raw = _no_finding_column()
    t, w = training_targets(raw, "ignore", "negative")
    assert w.ravel().tolist() == [1.0] * 6 and t.ravel().tolist() == [1, 1, 1, 0, 0, 0]
    probs = np.array([[0.9], [0.8], [0.4], [0.3], [0.5], [0.1]])
    m = multilabel_metrics(probs, evaluation_targets(raw, "negative"), ["No Finding"])
    assert m["counts"]["No Finding"] == {"positive": 3, "negative": 3}
    assert m["auroc"]["No Finding"] == pytest.approx(8 / 9)  # one of 9 pairs misordered (0.4 < 0.5)
    assert "No Finding" in m["auprc"] and "No Finding" in m["f1"]


def test_no_finding_is_unscorable_under_ignore():
    raw = _no_finding_column()
    t, w = training_targets(raw, "ignore", "ignore")
    assert w.ravel().tolist() == [1, 1, 1, 0, 0, 0]  # no negative ever reaches the loss
    m = multilabel_metrics(np.linspace(0.1, 0.9, 6)[:, None], evaluation_targets(raw, "ignore"), ["No Finding"])
    assert m["counts"]["No Finding"] == {"positive": 3, "negative": 0}
    assert m["auroc"] == {} and math.isnan(m["auroc_macro"])


def test_multilabel_metrics_per_label_and_macro():
    labels = np.array([[1, 0], [1, 1], [0, nan], [0, 0]], dtype=np.float64)
    probs = np.array([[0.9, 0.2], [0.6, 0.7], [0.4, 0.9], [0.1, 0.8]])
    m = multilabel_metrics(probs, labels, ["A", "B"], thresholds=np.array([0.5, 0.75]))
    assert m["auroc"] == {"A": 1.0, "B": 0.5}  # B: rows 0,1,3 (the NaN row is dropped)
    assert m["auroc_macro"] == pytest.approx(0.75)
    assert m["f1"]["A"] == 1.0 and m["f1"]["B"] == 0.0  # B at 0.75: predicts only row 3, a negative
    assert m["counts"]["B"] == {"positive": 1, "negative": 2}
    assert m["thresholds"] == {"A": 0.5, "B": 0.75} and m["n"] == 4


def test_choose_thresholds_maximises_f1_and_defaults_to_half():
    labels = np.array([[0, 0], [0, 0], [1, 0], [1, nan]], dtype=np.float64)
    probs = np.array([[0.1, 0.3], [0.35, 0.2], [0.4, 0.9], [0.8, 0.6]])
    th = choose_thresholds(probs, labels)
    assert th[0] == pytest.approx(0.4)  # the cut that keeps both positives and drops both negatives
    assert th[1] == 0.5  # no positives: the default
    m = multilabel_metrics(probs, labels, ["A", "B"], thresholds=th)
    assert m["f1"]["A"] == 1.0


def test_make_batch_masks_unlabelled_rows_and_passes_the_blank_policy():
    from medfuse_core.models import load_tokenizer

    labels = [[nan] * len(CHEXPERT_LABELS) for _ in range(3)]
    labels[0][CHEXPERT_LABELS.index("No Finding")] = 1.0
    img = pixels_to_bytes(np.full((8, 8), 0.5, dtype=np.float32))
    rows = {"image": [img] * 3, "image_size": [8] * 3, "context": ["cough", "", "fever"],
            "labels": labels, "labelled": np.array([True, True, False])}
    kw = dict(labels=["No Finding", "Edema"], image_size=8, max_tokens=8)
    tok = load_tokenizer("minilm")
    b = make_batch(rows, tok, **kw)  # defaults: uncertain ignore, blank negative
    assert b["weights"].tolist() == [[1, 1], [1, 1], [0, 0]]
    assert b["targets"].tolist() == [[1, 0], [0, 0], [0, 0]]
    ev = b["eval_labels"].numpy()
    assert ev[:2].tolist() == [[1, 0], [0, 0]] and np.isnan(ev[2]).all()
    b = make_batch(rows, tok, **kw, blank_policy="ignore")
    assert b["weights"].tolist() == [[1, 0], [0, 0], [0, 0]]
    without = {k: v for k, v in rows.items() if k != "labelled"}  # shards from before the column
    assert make_batch(without, tok, **kw)["weights"].tolist() == [[1, 1]] * 3
