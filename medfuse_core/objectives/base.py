"""What a training objective provides to the one training loop (``pipelines/train_loop.py``).

The loop owns everything shared by the stages: the data stream, the DeepSpeed engine,
checkpoints, resume, logging and the strided validation that keeps ranks in step. An
objective owns what differs: the model it trains, the shard columns it reads, how rows become
a batch, the loss, what validation collects per sample and the metrics computed from it.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn


class Objective:
    """Base class; subclasses are registered in :data:`medfuse_core.objectives.OBJECTIVES`.

    Attributes set by subclasses: ``stage`` (``"finetune"`` or ``"pretrain"``), ``columns``
    (shard columns read), ``labelled_only`` (train on labelled rows only), ``score_key`` (the
    validation metric that picks the best checkpoint, higher is better).
    """

    name: str = ""
    stage: str = ""
    columns: Sequence[str] = ()
    labelled_only: bool = True
    score_key: str = ""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    # -- model
    def build_model(self) -> nn.Module:
        """A fresh model for this stage (pretrained pieces loaded from local files)."""
        raise NotImplementedError

    def initial_model(self, init_from: str | None):
        """``(model, tensors copied)``: a fresh model, its encoders copied from the bundle folder
        ``init_from`` (a stage-1 model) when given."""
        model = self.build_model()
        if not init_from:
            return model, 0
        from medfuse_core.models.bundle import load_encoder_weights

        return model, load_encoder_weights(model, init_from)

    def tokenizer(self):
        """The tokenizer batches are made with (None: no text)."""
        from medfuse_core.models.text import load_tokenizer

        return load_tokenizer(self.cfg.model.text.name_or_path)

    # -- training
    def make_batch(self, rows: dict, tokenizer, *, train: bool, generator: torch.Generator) -> dict:
        """Tensors from a columnar batch of shard rows."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """The scalar loss of one (device-resident) batch; may run collectives (every rank calls it)."""
        raise NotImplementedError

    # -- validation
    def eval_begin(self, model: nn.Module, tokenizer, device) -> None:
        """Called on every rank before a validation pass (e.g. embed prompts: a forward on all ranks)."""

    def eval_outputs(self, model: nn.Module, batch: dict) -> dict[str, np.ndarray]:
        """Per-sample arrays of one validation batch (rows first)."""
        raise NotImplementedError

    def val_metrics(self, outputs: dict[str, np.ndarray]) -> dict[str, float]:
        """Validation metrics (``val/...``) from the concatenated outputs; holds ``score_key``."""
        raise NotImplementedError

    # -- artefacts
    def bundle_extra(self) -> dict:
        """What the saved model bundle records besides the weights (policies, objective)."""
        return {"objective": self.name}


def to_device(batch: dict, device, bf16: bool = False) -> dict:
    """Every tensor of ``batch`` on ``device``; float images in bfloat16 when ``bf16``."""
    out = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device, non_blocking=True)
            if bf16 and key == "images":
                value = value.bfloat16()
        out[key] = value
    return out
