"""Embedding images and report texts with a stage-1 (contrastive) bundle."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medfuse_core.data.batching import images_to_tensor, tokenize


@torch.no_grad()
def embed_images(bundle, images: Sequence[np.ndarray], batch_size: int = 64) -> np.ndarray:
    """Normalised image embeddings ``[N, D]`` for [0,1] grayscale images."""
    model = bundle.model.eval()
    out = [model.encode_images(images_to_tensor(images[i:i + batch_size], bundle.image_size)).float().numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)


@torch.no_grad()
def embed_texts(bundle, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Normalised text embeddings ``[N, D]`` (report sentences, prompts)."""
    model = bundle.model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tokenize(bundle.tokenizer, list(texts[i:i + batch_size]), bundle.model_config.text.max_tokens)
        out.append(model.encode_texts(enc["input_ids"], enc["attention_mask"]).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.embed_dim), np.float32)
