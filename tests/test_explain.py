"""Grad-CAM points at the image region that produces a finding."""

from __future__ import annotations

import numpy as np
import torch

from medfuse_core.config import ModelConfig
from medfuse_core.evaluation.explain import grad_cam
from medfuse_core.models import build_model

SIZE = 64


def _blob_images(n: int, rng: np.random.Generator):
    """Noise images; label 1 where a bright square sits in the top-left or bottom-right quadrant."""
    x = rng.normal(0.0, 0.3, (n, 1, SIZE, SIZE)).astype(np.float32)
    y = np.zeros((n, 1), np.float32)
    where = rng.integers(0, 3, n)  # 0: none, 1: top-left, 2: bottom-right
    for k, w in enumerate(where):
        if w:
            r, c = (6, 6) if w == 1 else (40, 40)
            x[k, 0, r:r + 18, c:c + 18] += 2.0
            y[k, 0] = 1.0
    return torch.from_numpy(x), torch.from_numpy(y), where


def test_grad_cam_peaks_where_the_finding_is():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = ModelConfig.model_validate({"vision": {"name": "resnet18"}, "text": {"name_or_path": "none"},
                                      "fusion": {"name": "concat", "dim": 32, "heads": 2}})
    model = build_model(cfg, num_labels=1, image_size=SIZE, load_vision_weights=False)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(40):
        x, y, _ = _blob_images(32, rng)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x)["logits"], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, _, where = _blob_images(24, np.random.default_rng(1))
    cams = grad_cam(model, x[where > 0], 0)
    assert cams.shape[0] == int((where > 0).sum()) and cams.min() >= 0 and cams.max() <= 1.0
    rows, cols = cams.shape[1:]
    hits = 0
    for cam, w in zip(cams, where[where > 0]):
        r, c = np.unravel_index(np.argmax(cam), cam.shape)
        top_left = r < rows / 2 and c < cols / 2
        bottom_right = r >= rows / 2 and c >= cols / 2
        hits += (w == 1 and top_left) or (w == 2 and bottom_right)
    assert hits >= 0.75 * len(cams), (hits, len(cams))
