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
