"""The CheXpert finding labels and the policies for uncertain (-1) labels.

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


def training_targets(labels: np.ndarray, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Turn raw labels (1/0/-1/NaN) into (targets, weights) for a masked BCE loss.

    Blank labels always get weight 0. Uncertain labels become 1 ("ones"), 0 ("zeros"),
    or weight 0 ("ignore").
    """
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"unknown uncertain-label policy {policy!r}; expected one of {UNCERTAIN_POLICIES}")
    labels = np.asarray(labels, dtype=np.float32)
    targets = np.where(labels == 1.0, 1.0, 0.0).astype(np.float32)
    weights = np.where(np.isnan(labels), 0.0, 1.0).astype(np.float32)
    uncertain = labels == -1.0
    if policy == "ones":
        targets[uncertain] = 1.0
    elif policy == "ignore":
        weights[uncertain] = 0.0
    return targets, weights


def evaluation_targets(labels: np.ndarray) -> np.ndarray:
    """Labels for scoring: 1/0 where certain, NaN where blank or uncertain."""
    labels = np.asarray(labels, dtype=np.float32)
    return np.where((labels == 1.0) | (labels == 0.0), labels, np.nan).astype(np.float32)
