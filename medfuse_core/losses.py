"""Training losses."""

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
