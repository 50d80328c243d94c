"""Explanations of a diagnosis model's findings: Grad-CAM (Selvaraju et al., 2017) on the vision
encoder's token grid. For one finding, the gradient of its logit with respect to the encoder's
output tokens, averaged over the grid, weighs each feature channel; the weighted sum, rectified
and scaled to [0, 1] per image, is a heat map of the grid that reaches the finding."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch


def grad_cam(model, images: torch.Tensor, label_index: int, text: Optional[dict] = None) -> np.ndarray:
    """Heat maps ``[B, rows, cols]`` in [0, 1] for the finding ``label_index`` (``text``: the
    tokenised context to score with, None for image-only)."""
    store: dict = {}

    def keep(_module, _inputs, output):
        output.retain_grad()
        store["tokens"] = output

    handle = model.vision_encoder.register_forward_hook(keep)
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            logits = model(images, **(text or {}))["logits"]
            model.zero_grad(set_to_none=True)
            logits[:, label_index].sum().backward()
    finally:
        handle.remove()
        model.train(was_training)
    tokens, grads = store["tokens"].detach(), store["tokens"].grad
    weights = grads.mean(dim=1, keepdim=True)  # [B, 1, D]: per channel, over the grid
    cam = torch.relu((tokens * weights).sum(-1))  # [B, N]
    cam = cam / cam.amax(dim=1, keepdim=True).clamp(min=1e-12)
    rows, cols = model.token_grid(images.shape[-2], images.shape[-1])
    model.zero_grad(set_to_none=True)
    return cam.reshape(len(images), rows, cols).numpy()
