"""Scoring with a loaded model bundle: image-only and image + clinical-context predictions."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medfuse_core.data.batching import blobs_to_images, images_to_tensor, tokenize


@torch.no_grad()
def predict_probabilities(bundle, images: Sequence[np.ndarray], texts: Sequence[str] | None,
                          batch_size: int = 64) -> np.ndarray:
    """Probabilities [N, L] for [0,1] grayscale images; ``texts`` None or empty strings = image only
    (always, for a bundle without a tokenizer: an image-only model)."""
    model = bundle.model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        x = images_to_tensor(images[start:start + batch_size], bundle.image_size)
        kwargs = {}
        if texts is not None and bundle.tokenizer is not None:
            chunk = list(texts[start:start + batch_size])
            if any(isinstance(t, str) and t.strip() for t in chunk):
                kwargs = tokenize(bundle.tokenizer, chunk, bundle.model_config.text.max_tokens)
        logits = model(x, **kwargs)["logits"]
        out.append(torch.sigmoid(logits.float()).numpy())
    return np.concatenate(out) if out else np.zeros((0, len(bundle.label_names)), np.float32)


def calibrated(bundle, probs: np.ndarray, mode: str) -> np.ndarray:
    """``probs`` after the bundle's temperature scaling for ``mode`` (``image_only`` or
    ``image_text``), fitted on validation when the model was trained; unchanged without one."""
    from medfuse_core.evaluation.calibration import calibrate_probabilities

    temps = ((bundle.extra or {}).get("calibration") or {}).get("temperatures", {}).get(mode)
    return probs if temps is None else calibrate_probabilities(probs, temps)


def score_rows(bundle, rows: dict) -> dict[str, np.ndarray]:
    """Both scores for a columnar batch of shard rows: ``image_only`` and ``image_text``
    (calibrated when the bundle carries temperatures), and each uncalibrated (``*_raw``).

    For an image-only model (no tokenizer) both are the image-only scores, computed once.
    """
    images = blobs_to_images(rows["image"], rows["image_size"])
    image_only = predict_probabilities(bundle, images, None)
    image_text = (image_only.copy() if bundle.tokenizer is None
                  else predict_probabilities(bundle, images, list(rows["context"])))
    return {"image_only": calibrated(bundle, image_only, "image_only"),
            "image_text": calibrated(bundle, image_text, "image_text"),
            "image_only_raw": image_only, "image_text_raw": image_text}


def predict_frame(bundle, images: list[np.ndarray], contexts: list[str]) -> dict[str, np.ndarray]:
    """Calibrated probabilities and 0/1 predictions for decoded images: image + context where a
    row has context (and the model reads text), else image-only; per-mode temperatures and
    thresholds from the bundle (0.5 when it has none)."""
    n, labels = len(images), bundle.label_names
    use_text = np.array([bundle.tokenizer is not None and isinstance(c, str) and bool(c.strip()) for c in contexts])
    probs = calibrated(bundle, predict_probabilities(bundle, images, None), "image_only")
    if use_text.any():
        idx = np.flatnonzero(use_text)
        text_probs = predict_probabilities(bundle, [images[i] for i in idx], [contexts[i] for i in idx])
        probs[idx] = calibrated(bundle, text_probs, "image_text")
    thresholds = (bundle.extra or {}).get("thresholds") or {}
    cut = np.full((n, len(labels)), 0.5, np.float32)
    for mode, rows in (("image_only", ~use_text), ("image_text", use_text)):
        if thresholds.get(mode) is not None:
            cut[rows] = np.asarray(thresholds[mode], np.float32)
    return {"prob": probs.astype(np.float32), "pred": (probs >= cut).astype(np.int8), "context_used": use_text}
