"""Stage 2 (diagnosis): the masked multi-label BCE loss and the objective that uses it."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def masked_bce_with_logits(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    pos_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Weighted mean binary cross-entropy: ``sum(w * bce) / sum(w)``.

    Entries with weight 0 (blank/ignored labels) contribute nothing, even if their
    target is NaN. When every weight is 0 the result is a 0 that still carries a
    (zero) gradient to ``logits``. Computed in float32; ``pos_weight [L]`` is passed
    to ``binary_cross_entropy_with_logits``.
    """
    logits = logits.float()
    weights = weights.to(logits.dtype)
    targets = torch.where(weights > 0, targets.to(logits.dtype), torch.zeros_like(logits))
    per_entry = F.binary_cross_entropy_with_logits(logits, targets, reduction="none", pos_weight=pos_weight)
    total = weights.sum()
    denom = torch.where(total > 0, total, torch.ones_like(total))
    return (per_entry * weights).sum() / denom


# ----------------------------------------------------------------------------- the stage-2 objective

from medfuse_core.objectives.base import Objective  # noqa: E402
from medfuse_core.objectives.registry import OBJECTIVES  # noqa: E402


@OBJECTIVES.register("bce")
class DiagnosisObjective(Objective):
    """Stage 2: multi-label diagnosis from the image and the clinical context, masked BCE.

    Validation scores every labelled image twice, with and without its context (one pass for
    an image-only model); the checkpoint score is the macro AUROC with context.
    """

    name = "bce"
    stage = "finetune"
    columns = ("image", "image_size", "context", "labels")
    labelled_only = True
    score_key = "val/auroc_macro"

    def build_model(self):
        """The :class:`~medfuse_core.models.diagnosis.DiagnosisModel` of ``cfg.model``."""
        from medfuse_core.models import build_model

        return build_model(self.cfg.model, num_labels=len(self.cfg.data.labels), image_size=self.cfg.data.image_size)

    def make_batch(self, rows, tokenizer, *, train, generator):
        """Images, tokenised context, targets and weights under the label policies."""
        from medfuse_core.data.batching import make_batch

        d = self.cfg.data
        return make_batch(rows, tokenizer, labels=d.labels, image_size=d.image_size,
                          max_tokens=self.cfg.model.text.max_tokens, uncertain_policy=d.uncertain_policy,
                          blank_policy=d.blank_policy, train=train, text_dropout=d.text_dropout,
                          augment_images=d.augment, generator=generator)

    @staticmethod
    def _logits(model, batch, text: bool) -> torch.Tensor:
        kwargs = {k: batch[k] for k in ("input_ids", "attention_mask", "text_present") if text and k in batch}
        return model(batch["images"], **kwargs)["logits"].float()

    def loss(self, model, batch):
        return masked_bce_with_logits(self._logits(model, batch, text=True), batch["targets"], batch["weights"])

    def eval_outputs(self, model, batch):
        p_txt = torch.sigmoid(self._logits(model, batch, text=True)).cpu().numpy()
        uses_text = getattr(getattr(model, "module", model), "uses_text", True)
        p_img = torch.sigmoid(self._logits(model, batch, text=False)).cpu().numpy() if uses_text else p_txt
        return {"p_text": p_txt, "p_image": p_img, "labels": batch["eval_labels"].cpu().numpy()}

    def val_metrics(self, outputs):
        from medfuse_core.evaluation.metrics import multilabel_metrics

        names = self.cfg.data.labels
        m_txt = multilabel_metrics(outputs["p_text"], outputs["labels"], names)
        m_img = multilabel_metrics(outputs["p_image"], outputs["labels"], names)
        score = m_txt["auroc_macro"] if m_txt["auroc_macro"] == m_txt["auroc_macro"] else 0.0
        metrics = {"val/auroc_macro": score, "val/auroc_macro_image_only": m_img["auroc_macro"],
                   "val/auprc_macro": m_txt["auprc_macro"]}
        for label, value in m_txt["auroc"].items():
            metrics[f"val/auroc/{label.replace(' ', '_')}"] = value
        return metrics

    def bundle_extra(self):
        return {"objective": self.name, "blank_policy": self.cfg.data.blank_policy,
                "uncertain_policy": self.cfg.data.uncertain_policy}
