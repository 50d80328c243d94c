"""From shard rows to model-ready tensors: images, clinical-context tokens, targets.

Used by the training workers, by evaluation and by the MLflow pyfunc wrapper, so every path
prepares inputs the same way.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from medfuse_core.data.labels import CHEXPERT_LABELS, evaluation_targets, training_targets

IMAGE_MEAN = 0.5
IMAGE_STD = 0.25


def label_indices(names: Sequence[str]) -> list[int]:
    """Positions of ``names`` in the CheXpert label order of the shards."""
    return [CHEXPERT_LABELS.index(n) for n in names]


def images_to_tensor(images: np.ndarray | Sequence[np.ndarray], size: int) -> torch.Tensor:
    """Stack [0,1] grayscale images into a normalised [B,1,size,size] tensor."""
    x = torch.as_tensor(np.stack([np.asarray(i, dtype=np.float32) for i in images]))[:, None]
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return (x - IMAGE_MEAN) / IMAGE_STD


def _uniform_size(blobs: Sequence[bytes], stored_sizes: Sequence[int]) -> int | None:
    """The one stored size of every blob (each exactly size² float16 values), else None."""
    sizes = np.asarray(stored_sizes, dtype=np.int64).reshape(-1)
    if len(sizes) == 0 or len(sizes) != len(blobs) or not np.all(sizes == sizes[0]):
        return None
    s = int(sizes[0])
    return s if all(len(b) == 2 * s * s for b in blobs) else None


def blobs_to_array(blobs: Sequence[bytes], stored_sizes: Sequence[int]) -> np.ndarray | None:
    """All blobs as one float16 ``[B, s, s]`` array in a single copy, when they share a size; else None."""
    s = _uniform_size(blobs, stored_sizes)
    if s is None:
        return None
    return np.frombuffer(b"".join(blobs), dtype=np.float16).reshape(len(blobs), s, s)


def blobs_to_images(blobs: Sequence[bytes], stored_sizes: Sequence[int]) -> list[np.ndarray]:
    """Decode shard image blobs (float16 bytes) into float32 arrays."""
    stacked = blobs_to_array(blobs, stored_sizes)
    if stacked is not None:
        return list(stacked.astype(np.float32))
    return [np.frombuffer(b, dtype=np.float16).reshape(int(s), int(s)).astype(np.float32)
            for b, s in zip(blobs, stored_sizes)]


def blobs_to_tensor(blobs: Sequence[bytes], stored_sizes: Sequence[int], size: int) -> torch.Tensor:
    """Shard image blobs straight to the normalised ``[B,1,size,size]`` float32 tensor.

    Same values as ``images_to_tensor(blobs_to_images(...), size)``, without per-row work when
    every blob has the stored size ``size``: one join, one float16 -> float32 pass that also
    normalises, one in-place shift (``(x - 0.5) / 0.25`` is exact in float32 either way).
    """
    stacked = blobs_to_array(blobs, stored_sizes)
    if stacked is None or stacked.shape[-1] != size:
        return images_to_tensor(blobs_to_images(blobs, stored_sizes), size)
    out = np.empty(stacked.shape, dtype=np.float32)
    np.multiply(stacked, np.float32(1.0 / IMAGE_STD), out=out, dtype=np.float32)
    out -= np.float32(IMAGE_MEAN / IMAGE_STD)
    return torch.from_numpy(out)[:, None]


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Light, label-preserving augmentation: small shifts/zoom, contrast and brightness jitter.

    No horizontal flips: laterality matters on a chest radiograph.
    """
    b = x.shape[0]
    scale = 1.0 + (torch.rand(b, generator=generator) - 0.5) * 0.12
    shift = (torch.rand(b, 2, generator=generator) - 0.5) * 0.12
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = scale
    theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, padding_mode="border", align_corners=False)
    contrast = 1.0 + (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    bright = (torch.rand(b, 1, 1, 1, generator=generator) - 0.5) * 0.3
    return x * contrast + bright


def tokenize(tokenizer, texts: Sequence[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Tokenise clinical-context texts; ``text_present`` is False for empty texts.

    ``tokenizer=None`` (an image-only model) gives no text keys at all.
    """
    if tokenizer is None:
        return {}
    texts = [t if isinstance(t, str) else "" for t in texts]
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_tokens,
                    return_tensors="pt")
    present = torch.tensor([bool(t.strip()) for t in texts])
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"].bool(),
            "text_present": present}


def make_batch(rows: dict, tokenizer, *, labels: Sequence[str], image_size: int, max_tokens: int,
               uncertain_policy: str = "ignore", blank_policy: str = "negative", train: bool = False,
               text_dropout: float = 0.0, augment_images: bool = False,
               generator: torch.Generator | None = None) -> dict:
    """Build a training/eval batch from a columnar batch of shard rows (dict of arrays).

    Rows with ``labelled`` False (a study without any label) get weight 0 and NaN eval labels.
    ``tokenizer=None`` (an image-only model): no text keys, and ``context`` is not read.
    """
    generator = generator or torch.Generator().manual_seed(0)
    images = blobs_to_tensor(rows["image"], rows["image_size"], image_size)
    if train and augment_images:
        images = augment(images, generator)
    text = tokenize(tokenizer, list(rows["context"]), max_tokens) if tokenizer is not None else {}
    if text and train and text_dropout > 0:
        keep = torch.rand(len(images), generator=generator) >= text_dropout
        text["text_present"] = text["text_present"] & keep
    raw = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])[:, label_indices(labels)]
    targets, weights = training_targets(raw, uncertain_policy, blank_policy)
    eval_labels = evaluation_targets(raw, blank_policy)
    if "labelled" in rows:
        unlabelled = ~np.asarray(rows["labelled"], dtype=bool)
        weights[unlabelled] = 0.0
        eval_labels[unlabelled] = np.nan
    return {
        "images": images,
        **text,
        "targets": torch.from_numpy(targets),
        "weights": torch.from_numpy(weights),
        "eval_labels": torch.from_numpy(eval_labels),
    }
