"""Matplotlib figures for MLflow: ROC curves, per-label AUROC, calibration."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402


def _labels_with_both(labels: np.ndarray, names):
    for j, name in enumerate(names):
        m = ~np.isnan(labels[:, j])
        y = labels[m, j]
        if 0 < y.sum() < y.size:
            yield j, name, m


def roc_curves(probs_by_mode: dict[str, np.ndarray], labels: np.ndarray, names) -> plt.Figure:
    """One panel per label, one ROC curve per scoring mode (image_only, image_text)."""
    items = list(_labels_with_both(labels, names))
    cols = 4
    rows = max(1, -(-len(items) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for ax, (j, name, m) in zip(axes.flat, items):
        ax.set_visible(True)
        for mode, probs in probs_by_mode.items():
            fpr, tpr, _ = roc_curve(labels[m, j], probs[m, j])
            from sklearn.metrics import auc

            ax.plot(fpr, tpr, label=f"{mode} ({auc(fpr, tpr):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        ax.set_title(f"{name} (n+={int(labels[m, j].sum())})", fontsize=10)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Test ROC curves")
    fig.tight_layout()
    return fig


def per_label_auroc(metrics_by_mode: dict[str, dict], names) -> plt.Figure:
    """Grouped bars of per-label test AUROC for each scoring mode."""
    shown = [n for n in names if any(n in m["auroc"] for m in metrics_by_mode.values())]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(shown) + 2), 4.5))
    width = 0.8 / max(1, len(metrics_by_mode))
    x = np.arange(len(shown))
    for k, (mode, m) in enumerate(metrics_by_mode.items()):
        vals = [m["auroc"].get(n, np.nan) for n in shown]
        ax.bar(x + k * width, vals, width, label=f"{mode} (macro {m['auroc_macro']:.3f})")
    ax.set_xticks(x + width * (len(metrics_by_mode) - 1) / 2)
    ax.set_xticklabels(shown, rotation=35, ha="right", fontsize=8)
    ax.set_ylim(0.4, 1.02)
    ax.axhline(0.5, color="k", lw=0.6, ls="--")
    ax.set_ylabel("AUROC")
    ax.set_title("Per-label test AUROC")
    ax.legend(fontsize=8, loc="lower left", framealpha=0.9)
    fig.tight_layout()
    return fig


def calibration(probs: np.ndarray, labels: np.ndarray, names, title: str) -> plt.Figure:
    """Reliability diagram per label (pooled bins) for one scoring mode."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    for j, name, m in _labels_with_both(labels, names):
        frac, mean = calibration_curve(labels[m, j], probs[m, j], n_bins=8, strategy="quantile")
        ax.plot(mean, frac, marker="o", ms=3, lw=1, label=name)
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig


def reliability_before_after(raw: np.ndarray, calibrated: np.ndarray, labels: np.ndarray, names,
                             mode: str) -> plt.Figure:
    """Reliability diagrams pooled over the findings, before and after temperature scaling,
    with each side's ECE (macro over findings) in the legend."""
    from medfuse_core.evaluation.calibration import ece_per_label, macro

    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for probs, tag, colour in ((raw, "uncalibrated", "#cc6677"), (calibrated, "temperature-scaled", "#4477aa")):
        keep = ~np.isnan(labels)
        if keep.sum() and 0 < labels[keep].sum() < keep.sum():
            frac, mean = calibration_curve(labels[keep], probs[keep], n_bins=10, strategy="quantile")
            ece = macro(ece_per_label(probs, labels, names))
            ax.plot(mean, frac, marker="o", ms=3, color=colour, label=f"{tag} (ECE {ece:.3f})")
    ax.set_xlabel("predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Reliability, {mode.replace('_', ' ')}, all findings pooled")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention_maps(images: np.ndarray, maps: np.ndarray, titles: list[str]) -> plt.Figure:
    """Images with the text-to-image attention (averaged over real text tokens) overlaid."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.4), squeeze=False)
    for ax, image, amap, title in zip(axes[0], images, maps, titles):
        ax.imshow(image, cmap="gray")
        ax.imshow(amap, cmap="inferno", alpha=0.45, extent=(0, image.shape[1], image.shape[0], 0),
                  interpolation="bilinear")
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.suptitle("Where the clinical context looks (co-attention, text → image)")
    fig.tight_layout()
    return fig


def heat_maps(images: np.ndarray, maps: np.ndarray, titles: list[str], title: str) -> plt.Figure:
    """Images with a [0, 1] heat map each (e.g. Grad-CAM) overlaid."""
    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3 * n, 3.4), squeeze=False)
    for ax, image, amap, label in zip(axes[0], images, maps, titles):
        ax.imshow(image, cmap="gray")
        ax.imshow(amap, cmap="jet", alpha=0.4, extent=(0, image.shape[1], image.shape[0], 0),
                  interpolation="bilinear", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig
