"""Calibrated probabilities: temperature scaling per finding, and expected calibration error.

Temperature scaling (Guo et al., 2017) divides each finding's logit by a temperature fitted on
the validation split by minimising the negative log-likelihood; it changes no ranking (AUROC is
unchanged) and only moves probabilities. Labels may be missing (NaN): those entries are left out.
"""

from __future__ import annotations

import numpy as np

T_MIN, T_MAX = 0.05, 20.0


def _nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    z = logits / temperature
    # log(1 + exp(-|z|)) form: stable for large logits
    return float(np.mean(np.maximum(z, 0) - z * labels + np.log1p(np.exp(-np.abs(z)))))


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature in [0.05, 20] minimising one finding's validation NLL (1.0 when the
    finding has no positive or no negative, where the fit is undefined)."""
    from scipy.optimize import minimize_scalar

    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, np.float64)
    keep = ~np.isnan(labels)
    logits, labels = logits[keep], labels[keep]
    if labels.size == 0 or labels.min() == labels.max():
        return 1.0
    res = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t))),
                          bounds=(np.log(T_MIN), np.log(T_MAX)), method="bounded")
    return float(np.exp(res.x))


def fit_temperatures(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One temperature per finding (columns of ``logits [N, L]`` and ``labels [N, L]``)."""
    logits, labels = np.asarray(logits), np.asarray(labels)
    return np.asarray([fit_temperature(logits[:, j], labels[:, j]) for j in range(logits.shape[1])], np.float32)


def apply_temperatures(logits: np.ndarray, temperatures: np.ndarray) -> np.ndarray:
    """Calibrated probabilities ``sigmoid(logits / T)`` per finding."""
    z = np.asarray(logits, np.float64) / np.asarray(temperatures, np.float64)
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> float:
    """ECE of one finding: the mean |accuracy - confidence| over equal-width probability bins,
    weighted by the bins' shares of the (non-missing) samples."""
    probs, labels = np.asarray(probs, np.float64), np.asarray(labels, np.float64)
    keep = ~np.isnan(labels)
    probs, labels = probs[keep], labels[keep]
    if probs.size == 0:
        return float("nan")
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        m = bins == b
        if m.any():
            ece += m.mean() * abs(labels[m].mean() - probs[m].mean())
    return float(ece)


def ece_per_label(probs: np.ndarray, labels: np.ndarray, names, n_bins: int = 10) -> dict[str, float]:
    """ECE for every finding column, by name."""
    return {name: expected_calibration_error(probs[:, j], labels[:, j], n_bins) for j, name in enumerate(names)}


def logits_from_probabilities(probs: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """``log(p / (1 - p))``, with ``p`` clipped to ``[eps, 1 - eps]``."""
    p = np.clip(np.asarray(probs, np.float64), eps, 1.0 - eps)
    return np.log(p) - np.log1p(-p)


def calibrate_probabilities(probs: np.ndarray, temperatures) -> np.ndarray:
    """Temperature-scaled probabilities from uncalibrated ones (per finding column)."""
    return apply_temperatures(logits_from_probabilities(probs), np.asarray(temperatures, np.float64))


def fit_calibration(probs_by_mode: dict[str, np.ndarray], labels: np.ndarray, names) -> dict:
    """Per scoring mode: temperatures fitted on these (validation) probabilities, the F1-best
    operating point per finding on the calibrated probabilities, and ECE before and after.

    Returns ``{"temperatures": {mode: [L]}, "thresholds": {mode: [L]}, "ece_before": {mode:
    {label: e}}, "ece_after": {...}, "label_names": names, "n": N}``, JSON-ready.
    """
    from medfuse_core.evaluation.metrics import choose_thresholds

    out: dict = {"temperatures": {}, "thresholds": {}, "ece_before": {}, "ece_after": {},
                 "label_names": list(names), "n": int(len(labels))}
    for mode, probs in probs_by_mode.items():
        temps = fit_temperatures(logits_from_probabilities(probs), labels)
        calibrated = calibrate_probabilities(probs, temps)
        out["temperatures"][mode] = [float(t) for t in temps]
        out["thresholds"][mode] = [float(t) for t in choose_thresholds(calibrated, labels)]
        out["ece_before"][mode] = ece_per_label(probs, labels, names)
        out["ece_after"][mode] = ece_per_label(calibrated, labels, names)
    return out


def macro(values: dict[str, float]) -> float:
    """The mean of the non-NaN values (NaN if none)."""
    finite = [v for v in values.values() if v == v]
    return float(np.mean(finite)) if finite else float("nan")
