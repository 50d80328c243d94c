"""The stage-1 model: a vision encoder and a text encoder aligned in one embedding space.

``ContrastiveModel`` (optionally after ``text_mixer_layers`` trainable transformer layers over
the text tokens) pools each encoder's tokens (image: mean over the feature map or patch
tokens; text: the text encoder's pooling, a mean over real tokens for MiniLM-class sentence
encoders and the last real token for a causal LM), projects both to ``embed_dim`` and L2-normalises them. Its learnable temperature (and
SigLIP bias) live in ``logit_scale``. The encoders keep the attribute names
``vision_encoder`` / ``text_encoder`` of :class:`~medfuse_core.models.diagnosis.DiagnosisModel`,
so stage 2 takes their weights by name (:func:`encoder_state`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from medfuse_core.models.param_groups import optimizer_groups
from medfuse_core.models.text import TextEncoder, build_text_encoder
from medfuse_core.models.vision import VisionEncoder, build_vision_encoder
from medfuse_core.objectives.contrastive import LogitScale

# the weights stage 2 takes from a stage-1 bundle (prefixes of the state dict)
ENCODER_PREFIXES = ("vision_encoder.", "text_encoder.")


class ContrastiveModel(nn.Module):
    """Image and report encoders with projection heads into a shared, normalised space."""

    def __init__(self, vision_encoder: VisionEncoder, text_encoder: TextEncoder, embed_dim: int,
                 objective: str = "infonce", image_size: int = 224, init_temperature: Optional[float] = None,
                 text_mixer_layers: int = 0):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        hidden = text_encoder.hidden_size
        # optional transformer layers over the text tokens (pre-norm, heads of 64 dims)
        self.text_mixer = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(hidden, max(1, hidden // 64), dim_feedforward=2 * hidden, dropout=0.1,
                                       batch_first=True, norm_first=True),
            text_mixer_layers, enable_nested_tensor=False) if text_mixer_layers else None
        self.image_head = nn.Sequential(nn.LayerNorm(vision_encoder.out_dim),
                                        nn.Linear(vision_encoder.out_dim, embed_dim))
        self.text_head = nn.Sequential(nn.LayerNorm(text_encoder.hidden_size),
                                       nn.Linear(text_encoder.hidden_size, embed_dim))
        self.logit_scale = LogitScale(objective, init_temperature)
        self.embed_dim = embed_dim
        self.image_size = image_size
        self.num_labels = 0  # no classifier head: a stage-1 bundle carries no label outputs

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> normalised image embeddings ``[B, embed_dim]``."""
        return F.normalize(self.image_head(self.vision_encoder(images).mean(1)), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, T]`` + mask -> normalised text embeddings ``[B, embed_dim]``."""
        hidden = self.text_encoder(input_ids, attention_mask)
        if self.text_mixer is not None:
            hidden = self.text_mixer(hidden, src_key_padding_mask=~attention_mask.bool())
        return F.normalize(self.text_head(self.text_encoder.pool(hidden, attention_mask.bool())), dim=-1)

    def forward(self, images: torch.Tensor, input_ids: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None, **_: Any) -> dict[str, torch.Tensor]:
        """``{"image": [B, D], "text": [B, D], "scale": [], "bias": [] or None}`` (text only when
        ids are given)."""
        scale, bias = self.logit_scale(with_bias=True)
        out = {"image": self.encode_images(images), "scale": scale, "bias": bias}
        if input_ids is not None:
            out["text"] = self.encode_texts(input_ids, attention_mask if attention_mask is not None
                                            else torch.ones_like(input_ids))
        return out

    @property
    def uses_text(self) -> bool:
        """Always true: both encoders train together."""
        return True

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimizer groups: the text encoder at ``text_lr``, the rest at ``lr``; no decay on
        biases, norms and the temperature (all ``ndim <= 1``)."""
        return optimizer_groups(self, lr, text_lr, weight_decay)


def build_contrastive_model(cfg, image_size: int, objective: str = "infonce", *,
                            init_temperature: Optional[float] = None, text_config=None,
                            load_vision_weights: bool = True) -> ContrastiveModel:
    """Build from a :class:`~medfuse_core.config.PretrainModelConfig` (vision, text, ``embed_dim``)
    and the objective's name (``siglip`` adds the learnable bias)."""
    vision = build_vision_encoder(cfg.vision, image_size, load_weights=load_vision_weights)
    text = build_text_encoder(cfg.text, config=text_config)
    return ContrastiveModel(vision, text, cfg.embed_dim, objective=objective, image_size=image_size,
                            init_temperature=init_temperature, text_mixer_layers=cfg.text_mixer_layers)


def encoder_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder weights of a stage-1 (or stage-2) state dict, by name, for initialising stage 2."""
    return {k: v for k, v in state_dict.items() if k.startswith(ENCODER_PREFIXES)}
