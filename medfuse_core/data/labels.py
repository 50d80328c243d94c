"""The CheXpert finding labels and the policies for uncertain (-1) and blank labels.

Label values follow the MIMIC-CXR / CheXpert convention: 1.0 positive, 0.0 negative,
-1.0 uncertain, NaN (blank) not mentioned.
"""

from __future__ import annotations

import numpy as np

CHEXPERT_LABELS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Enlarged Cardiomediastinum",
    "Fracture",
    "Lung Lesion",
    "Lung Opacity",
    "No Finding",
    "Pleural Effusion",
    "Pleural Other",
    "Pneumonia",
    "Pneumothorax",
    "Support Devices",
)

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
# A blank cell means "not mentioned in the report". "negative": train and score it as 0 (the
# usual MIMIC-CXR/CheXpert practice; "No Finding", only ever 1.0 or blank, gets its negatives
# this way). "ignore": weight 0 in training and left out of scoring.
BLANK_POLICIES = ("negative", "ignore")


def _checked(labels: np.ndarray, uncertain_policy: str | None, blank_policy: str) -> np.ndarray:
    if uncertain_policy is not None and uncertain_policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"unknown uncertain-label policy {uncertain_policy!r}; expected one of {UNCERTAIN_POLICIES}")
    if blank_policy not in BLANK_POLICIES:
        raise ValueError(f"unknown blank-label policy {blank_policy!r}; expected one of {BLANK_POLICIES}")
    labels = np.asarray(labels, dtype=np.float32)
    known = np.isnan(labels) | (labels == 1.0) | (labels == 0.0) | (labels == -1.0)
    if not known.all():
        raise ValueError("labels must be 1, 0, -1 or NaN (blank)")
    return labels


def training_targets(labels: np.ndarray, uncertain_policy: str,
                     blank_policy: str = "negative") -> tuple[np.ndarray, np.ndarray]:
    """Turn raw labels (1/0/-1/NaN) into (targets, weights) for a masked BCE loss.

    Certain 1/0 are kept with weight 1. Uncertain (-1) become 1 ("ones"), 0 ("zeros") or
    weight 0 ("ignore"). Blank (NaN) become 0 ("negative") or weight 0 ("ignore").
    """
    labels = _checked(labels, uncertain_policy, blank_policy)
    blank, uncertain = np.isnan(labels), labels == -1.0
    targets = (labels == 1.0).astype(np.float32)
    weights = np.ones_like(labels, dtype=np.float32)
    if uncertain_policy == "ones":
        targets[uncertain] = 1.0
    elif uncertain_policy == "ignore":
        weights[uncertain] = 0.0
    if blank_policy == "ignore":
        weights[blank] = 0.0
    return targets, weights


def evaluation_targets(labels: np.ndarray, blank_policy: str = "negative") -> np.ndarray:
    """Labels for scoring: certain 1/0 kept, uncertain NaN (not scored), blank 0 ("negative") or NaN ("ignore")."""
    labels = _checked(labels, None, blank_policy)
    out = np.where(labels == -1.0, np.nan, labels).astype(np.float32)
    if blank_policy == "negative":
        out[np.isnan(labels)] = 0.0
    return out
