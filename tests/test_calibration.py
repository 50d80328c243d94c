"""Temperature scaling lowers the calibration error of a known miscalibrated model."""

from __future__ import annotations

import numpy as np

from medfuse_core.evaluation.calibration import (apply_temperatures, ece_per_label, expected_calibration_error,
                                                 fit_temperatures)


def _overconfident(n, seed, scale=3.0):
    """Labels drawn from true probabilities sigmoid(z); the model reports logits scale * z."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, size=(n, 3))
    labels = (rng.random((n, 3)) < 1 / (1 + np.exp(-z))).astype(np.float32)
    return z * scale, labels


def test_temperature_scaling_recovers_the_overconfidence_and_lowers_ece():
    val_logits, val_labels = _overconfident(4000, 0)
    test_logits, test_labels = _overconfident(4000, 1)
    temps = fit_temperatures(val_logits, val_labels)
    assert np.allclose(temps, 3.0, rtol=0.15), temps  # the model was 3x overconfident
    before = expected_calibration_error(1 / (1 + np.exp(-test_logits[:, 0])), test_labels[:, 0])
    after = expected_calibration_error(apply_temperatures(test_logits, temps)[:, 0], test_labels[:, 0])
    assert after < before / 2, (before, after)
    # ranking is unchanged
    assert np.array_equal(np.argsort(test_logits[:, 1]), np.argsort(apply_temperatures(test_logits, temps)[:, 1]))


def test_missing_labels_and_one_class_findings():
    logits, labels = _overconfident(500, 2)
    labels[::3, 0] = np.nan
    labels[:, 2] = 0.0  # no positive: the fit is undefined, the temperature stays 1
    temps = fit_temperatures(logits, labels)
    assert np.isfinite(temps).all() and temps[2] == 1.0
    eces = ece_per_label(apply_temperatures(logits, temps), labels, ["a", "b", "c"])
    assert set(eces) == {"a", "b", "c"} and all(0 <= v <= 1 for v in eces.values())


def test_perfectly_calibrated_scores_have_small_ece():
    rng = np.random.default_rng(3)
    p = rng.random(20000)
    y = (rng.random(20000) < p).astype(np.float32)
    assert expected_calibration_error(p, y) < 0.02


def test_fit_calibration_per_mode_lowers_validation_ece_and_keeps_rankings():
    from medfuse_core.evaluation.calibration import calibrate_probabilities, fit_calibration, macro

    logits, labels = _overconfident(3000, 2)
    labels[:50, 0] = np.nan  # missing labels are left out
    probs = 1 / (1 + np.exp(-logits))
    cal = fit_calibration({"image_only": probs, "image_text": probs[::-1].copy()}, labels, ["a", "b", "c"])
    assert set(cal["temperatures"]) == {"image_only", "image_text"} and len(cal["thresholds"]["image_only"]) == 3
    assert macro(cal["ece_after"]["image_only"]) < macro(cal["ece_before"]["image_only"]) / 2
    again = calibrate_probabilities(probs, cal["temperatures"]["image_only"])
    order = np.argsort(probs[:, 2], kind="stable")
    assert np.all(np.diff(again[order, 2]) >= 0)  # monotone: no ranking inverts (AUROC is unchanged)
