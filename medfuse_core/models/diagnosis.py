"""The diagnosis model: vision encoder (+ optional text encoder) -> fusion -> multi-label head."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medfuse_core.config import ModelConfig
from medfuse_core.models.fusion import build_fusion
from medfuse_core.models.heads import build_head
from medfuse_core.models.param_groups import optimizer_groups
from medfuse_core.models.text import TextEncoder, build_text_encoder
from medfuse_core.models.vision import VisionEncoder, build_vision_encoder

# parameter leaf names that act like embeddings/biases and get no weight decay
NO_DECAY_NAMES = frozenset({"null_text", "pos_table", "class_token", "pos_embedding"})


class LearnedPositions2d(nn.Module):
    """A learned ``[rows, cols]`` table of ``dim``-d position embeddings.

    ``forward(rows, cols) -> [1, rows*cols, dim]`` (row-major, matching flattened
    feature maps); a different grid than the one built for is bilinearly resized.
    """

    def __init__(self, dim: int, rows: int, cols: int):
        super().__init__()
        self.pos_table = nn.Parameter(torch.zeros(1, dim, rows, cols))
        nn.init.trunc_normal_(self.pos_table, std=0.02)

    def forward(self, rows: int, cols: int) -> torch.Tensor:
        """Embeddings for a ``rows x cols`` grid."""
        table = self.pos_table
        if tuple(table.shape[-2:]) != (rows, cols):
            table = F.interpolate(table, size=(rows, cols), mode="bilinear", align_corners=False)
        return table.flatten(2).transpose(1, 2)


class DiagnosisModel(nn.Module):
    """Image (+ optional report text) -> multi-label logits.

    Vision tokens go through LayerNorm + Linear to ``dim`` (plus a learned 2-D position
    embedding for CNN feature maps; ViT tokens already carry positions); text hidden
    states go through LayerNorm + Linear to ``dim``; the fusion module combines them
    and the head produces ``[B, num_labels]`` logits.

    ``text_encoder=None`` builds an image-only model (no text encoder, no text projection):
    ``forward`` ignores any text arguments and the fusion sees zero-length text.
    """

    def __init__(
        self,
        vision_encoder: VisionEncoder,
        text_encoder: Optional[TextEncoder],
        fusion: nn.Module,
        head: nn.Module,
        dim: int,
        image_size: int,
        num_labels: int,
        image_skip: bool = False,
    ):
        super().__init__()
        self.vision_encoder = vision_encoder
        # model.head.image_skip: a linear read-out of the pooled vision features added to the logits
        self.image_head = nn.Linear(vision_encoder.out_dim, num_labels) if image_skip else None
        self.vision_proj = nn.Sequential(nn.LayerNorm(vision_encoder.out_dim), nn.Linear(vision_encoder.out_dim, dim))
        self.image_pos: Optional[LearnedPositions2d] = None
        if not vision_encoder.has_positions:
            self.image_pos = LearnedPositions2d(dim, *vision_encoder.grid_size(image_size, image_size))
        self.text_encoder = text_encoder
        self.text_proj: Optional[nn.Module] = None
        if text_encoder is not None:
            self.text_proj = nn.Sequential(nn.LayerNorm(text_encoder.hidden_size),
                                           nn.Linear(text_encoder.hidden_size, dim))
        self.fusion = fusion
        self.head = head
        self.dim = dim
        self.image_size = image_size
        self.num_labels = num_labels

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Image token grid ``(rows, cols)`` for an input size; reshapes attention maps to heatmaps."""
        return self.vision_encoder.grid_size(height, width)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """``[B,C,H,W]`` -> projected image tokens ``[B, Ni, dim]``."""
        return self._project_image(self.vision_encoder(images), images)

    def _project_image(self, features: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision_proj(features)
        if self.image_pos is not None:
            rows, cols = self.token_grid(*images.shape[-2:])
            tokens = tokens + self.image_pos(rows, cols).to(tokens.dtype)
        return tokens

    def forward(
        self,
        images: torch.Tensor,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        text_present: Optional[torch.Tensor] = None,
    ) -> dict[str, Any]:
        """Returns ``{"logits": [B, L], "attention": {name: map}}``.

        ``text_present [B]`` (bool) hides the whole text of rows where it is False;
        ``input_ids=None`` predicts from images only and skips the text encoder, as does a
        model without a text encoder or a fusion module that uses no text (any text
        arguments are then ignored).
        """
        features = self.vision_encoder(images)
        img = self._project_image(features, images)
        b = img.shape[0]
        if input_ids is None or not self.uses_text:
            txt = img.new_zeros(b, 0, self.dim)
            mask = torch.zeros(b, 0, dtype=torch.bool, device=img.device)
        else:
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            txt = self.text_proj(self.text_encoder(input_ids, attention_mask))
            mask = attention_mask.to(torch.bool)
            if text_present is not None:
                mask = mask & text_present.to(device=mask.device, dtype=torch.bool).unsqueeze(1)
        out = self.fusion(img, txt, mask)
        logits = self.head(out.fused)
        if self.image_head is not None:
            logits = logits + self.image_head(features.mean(dim=1))
        return {"logits": logits, "attention": out.attention}

    @property
    def uses_text(self) -> bool:
        """True when the model has a text encoder and its fusion module reads text."""
        return self.text_encoder is not None and getattr(self.fusion, "uses_text", True)

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups (:func:`~medfuse_core.models.param_groups.optimizer_groups`); the
        embedding-like tokens (``NO_DECAY_NAMES``) get no weight decay either."""
        return optimizer_groups(self, lr, text_lr, weight_decay, NO_DECAY_NAMES)


def build_model(
    cfg: ModelConfig,
    num_labels: int,
    image_size: int,
    *,
    text_config=None,
    load_vision_weights: bool = True,
) -> DiagnosisModel:
    """Build a :class:`DiagnosisModel` from a :class:`ModelConfig`.

    By default the text encoder is loaded with ``from_pretrained(cfg.text.name_or_path)``
    and the vision weights from ``cfg.vision.weights_path`` (if set);
    ``cfg.text.name_or_path: none`` builds no text encoder (an image-only model). For rebuilding a
    saved model without the original files, pass ``text_config`` (a transformers config:
    the text encoder is built with ``from_config``, random weights) and
    ``load_vision_weights=False``; the caller then loads the full state dict.
    """
    if num_labels < 1:
        raise ValueError("num_labels must be >= 1")
    vision = build_vision_encoder(cfg.vision, image_size, load_weights=load_vision_weights)
    text = None
    if cfg.text.enabled:
        text = build_text_encoder(cfg.text, config=text_config)
    f = cfg.fusion
    fusion = build_fusion(f.name, dim=f.dim, heads=f.heads, layers=f.layers, dropout=f.dropout)
    head = build_head(cfg.head, fusion.out_dim, num_labels)
    return DiagnosisModel(vision, text, fusion, head, dim=f.dim, image_size=image_size, num_labels=num_labels,
                          image_skip=cfg.head.image_skip)
