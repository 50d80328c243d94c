"""Image-report contrastive losses for stage-1 pretraining (InfoNCE / CLIP and sigmoid / SigLIP).

Both losses take this rank's *local* L2-normalised features ``[B, D]`` and gather the other
ranks' features themselves (with gradients), following the "local loss" scheme: each rank scores
its local rows against the gathered global batch, so logits are ``[B, world * B]`` (memory linear
in the number of workers). With the gradients then averaged over ranks (DDP / DeepSpeed), every
parameter receives exactly the gradient of the single-process loss on the global batch, and the
mean of the ranks' losses equals that loss.

Assumption: every rank passes the same local batch size ``B`` (and feature width ``D``), as
``all_gather`` requires; pad or drop the last uneven batch upstream.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "CONTRASTIVE_LOSSES",
    "LogitScale",
    "duplicate_mask",
    "gather_features",
    "shared_positives",
    "infonce_loss",
    "siglip_loss",
]

_KINDS = ("infonce", "siglip")
_DEFAULT_TEMPERATURE = {"infonce": 0.07, "siglip": 0.1}  # siglip: scale log(10), as in the paper
_DEFAULT_BIAS = -10.0  # siglip only, as in the paper


class LogitScale(nn.Module):
    """Learnable logit scale ``1 / T``, stored as ``log(1 / T)``, plus a SigLIP bias.

    ``forward()`` returns ``exp(log_scale)`` capped at :attr:`max_scale` (100); above the cap the
    scale gets no gradient. ``kind="infonce"`` (CLIP) defaults to ``T = 0.07`` and has no bias
    (``self.bias is None``); ``kind="siglip"`` defaults to scale 10 (``T = 0.1``) and a learnable
    scalar bias initialised to -10.
    """

    max_scale = 100.0

    def __init__(self, kind: str, init_temperature: Optional[float] = None, init_bias: Optional[float] = None):
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"unknown contrastive loss kind {kind!r}; choose one of {list(_KINDS)}")
        if init_temperature is None:
            init_temperature = _DEFAULT_TEMPERATURE[kind]
        if not (math.isfinite(init_temperature) and init_temperature > 0):
            raise ValueError(f"init_temperature must be a positive number, got {init_temperature!r}")
        self.kind = kind
        # shape [1], not []: DeepSpeed's start-up broadcast views each parameter as bytes, which a
        # 0-dim tensor cannot do; forward returns scalars
        self.log_scale = nn.Parameter(torch.tensor([math.log(1.0 / init_temperature)]))
        if kind == "siglip":
            bias = _DEFAULT_BIAS if init_bias is None else float(init_bias)
            self.bias: Optional[nn.Parameter] = nn.Parameter(torch.tensor([bias]))
        else:
            # An unused bias parameter would break DDP's unused-parameter check; refuse it.
            if init_bias is not None:
                raise ValueError("a logit bias is only used by kind='siglip'")
            self.register_parameter("bias", None)

    def forward(self, with_bias: bool = False):
        """The scale; with ``with_bias`` the pair ``(scale, bias)`` (bias None for InfoNCE).

        A model calls this inside its own forward so that ZeRO-3 gathers both parameters.
        """
        scale = self.log_scale.exp().clamp(max=self.max_scale)[0]
        if with_bias:
            return scale, (self.bias[0] if self.bias is not None else None)
        return scale

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` along dim 0 whose backward sums the gradient over ranks and keeps this rank's rows.

    Uses only ``all_gather`` and ``all_reduce``, so it runs on every backend (gloo CPU/CUDA, NCCL).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = x.contiguous()
        world = dist.get_world_size()
        ctx.rank, ctx.local = dist.get_rank(), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local
        return grad[start : start + ctx.local]


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(features: torch.Tensor) -> torch.Tensor:
    """All ranks' ``features`` concatenated along dim 0 in rank order, differentiably.

    In a single process (or world size 1) returns ``features`` itself. Every rank must pass the
    same shape. The gradient reaching this rank's input is the sum over ranks of the gradients
    of their losses with respect to this rank's rows.
    """
    _, world = _rank_world()
    if world == 1:
        return features
    return _AllGatherWithGrad.apply(features)


def _gather_ids(ids: torch.Tensor) -> torch.Tensor:
    """All ranks' ``ids`` ``[B]`` concatenated in rank order (no gradient)."""
    _, world = _rank_world()
    if world == 1:
        return ids
    parts = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(parts, ids.contiguous())
    return torch.cat(parts)


def duplicate_mask(text_ids: torch.Tensor) -> torch.Tensor:
    """``[B, world * B]`` True where a local row's text equals a gathered row's text other than its
    own pair: an identical report ("No acute cardiopulmonary process.") is no negative.

    ``text_ids``: this rank's ``[B]`` int64 digests of the paired texts; gathered across ranks.
    Symmetric in use: image i vs text j and text i vs image j share the test ``id_i == id_j``.
    """
    rank, _ = _rank_world()
    all_ids = _gather_ids(text_ids)
    mask = text_ids[:, None] == all_ids[None, :]
    local = text_ids.shape[0]
    mask[torch.arange(local, device=mask.device), torch.arange(local, device=mask.device) + rank * local] = False
    return mask


def shared_positives(group_ids: torch.Tensor) -> torch.Tensor:
    """``[B, world * B]`` True where a local row and a gathered row belong to the same group,
    the row's own pair included (the diagonal at ``rank * B``).

    ``group_ids``: this rank's ``[B]`` int64 group digests (for example, of what a report labeler
    reads in each report: two reports that both read "left pleural effusion, nothing else" share
    a group); gathered across ranks. Used as the positives of a multi-positive contrastive loss
    (supervised-contrastive style), instead of scoring a same-reading report as a negative.
    """
    rank, _ = _rank_world()
    mask = group_ids[:, None] == _gather_ids(group_ids)[None, :]
    local = group_ids.shape[0]
    mask[torch.arange(local, device=mask.device), torch.arange(local, device=mask.device) + rank * local] = True
    return mask


def _multi_positive_ce(logits: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-mean_{j in P(i)} log softmax(logits_i)_j`` (each row has a positive)."""
    logp = F.log_softmax(logits, dim=1)
    pos = positives.to(logp.dtype)
    return (-(logp.masked_fill(~positives, 0.0) * pos).sum(1) / pos.sum(1)).mean()


def _check_pair(img: torch.Tensor, txt: torch.Tensor) -> None:
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"expected image and text features of equal shape [B, D], got {tuple(img.shape)} and {tuple(txt.shape)}")


def _compute_dtype(img: torch.Tensor) -> torch.dtype:
    return torch.promote_types(img.dtype, torch.float32)


def infonce_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor,
                 text_ids: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP): ``0.5 * (CE(image -> text) + CE(text -> image))``.

    ``img``, ``txt``: this rank's L2-normalised features ``[B, D]`` (row i of each is a pair);
    ``logit_scale``: the scalar ``1 / T``. Local images are scored against all gathered texts and
    local texts against all gathered images; the positives sit at ``arange(B) + rank * B``. Each
    cross-entropy is the mean over the local rows, so the mean over ranks is the global-batch loss.
    ``text_ids`` (``[B]`` int64 digests of the texts): pairs whose texts are identical are left out
    of each other's negatives (:func:`duplicate_mask`). ``group_ids`` (``[B]`` int64): rows of the
    same group are each other's positives (:func:`shared_positives`); each row's loss is then the
    mean negative log-probability of its positives (the supervised-contrastive form), which equals
    plain InfoNCE when every group is a single pair. ``text_ids`` is ignored when groups are given.
    """
    _check_pair(img, txt)
    rank, _ = _rank_world()
    dtype = _compute_dtype(img)
    img, txt = img.to(dtype), txt.to(dtype)
    all_img, all_txt = gather_features(img), gather_features(txt)
    scale = logit_scale.to(dtype)
    logits_i2t = scale * img @ all_txt.T
    logits_t2i = scale * txt @ all_img.T
    if group_ids is not None:
        positives = shared_positives(group_ids)
        return 0.5 * (_multi_positive_ce(logits_i2t, positives) + _multi_positive_ce(logits_t2i, positives))
    if text_ids is not None:
        mask = duplicate_mask(text_ids)
        logits_i2t = logits_i2t.masked_fill(mask, float("-inf"))
        logits_t2i = logits_t2i.masked_fill(mask, float("-inf"))
    targets = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
    return 0.5 * (F.cross_entropy(logits_i2t, targets) + F.cross_entropy(logits_t2i, targets))


def siglip_loss(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                text_ids: Optional[torch.Tensor] = None, group_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pairwise sigmoid loss (SigLIP), per image: ``-(1/B) sum_i sum_j log sigmoid(z_ij * s_ij)``.

    ``s_ij = logit_scale * <img_i, txt_j> + logit_bias``, ``z_ij = +1`` for the matching pair and
    ``-1`` otherwise. Here ``i`` runs over this rank's ``B`` local images and ``j`` over all
    gathered texts, and the sum is divided by the local ``B`` (the paper's normalisation). In one
    process that is the loss divided by the global batch size; over ``W`` ranks the mean of the
    ranks' losses is the same number, since every pair is counted on exactly one rank.
    ``text_ids``: pairs of rows with identical texts (other than the positive) are left out.
    ``group_ids``: pairs of rows of the same group are positives (``z_ij = +1``); ``text_ids`` is
    then ignored.
    """
    _check_pair(img, txt)
    rank, _ = _rank_world()
    dtype = _compute_dtype(img)
    img, txt = img.to(dtype), txt.to(dtype)
    all_txt = gather_features(txt)
    logits = logit_scale.to(dtype) * img @ all_txt.T + logit_bias.to(dtype)
    local = img.shape[0]
    positives = torch.arange(local, device=img.device) + rank * local
    signs = torch.full_like(logits, -1.0)
    signs[torch.arange(local, device=img.device), positives] = 1.0
    if group_ids is not None:
        signs = signs.masked_fill(shared_positives(group_ids), 1.0)
        return -F.logsigmoid(signs * logits).sum() / local
    terms = -F.logsigmoid(signs * logits)
    if text_ids is not None:
        terms = terms.masked_fill(duplicate_mask(text_ids), 0.0)
    return terms.sum() / local


def _infonce(img: torch.Tensor, txt: torch.Tensor, scale: LogitScale, text_ids=None, group_ids=None) -> torch.Tensor:
    return infonce_loss(img, txt, scale(), text_ids, group_ids)


def _siglip(img: torch.Tensor, txt: torch.Tensor, scale: LogitScale, text_ids=None, group_ids=None) -> torch.Tensor:
    if scale.bias is None:
        raise ValueError("siglip needs a LogitScale(kind='siglip') (one with a bias)")
    return siglip_loss(img, txt, *scale(with_bias=True), text_ids=text_ids, group_ids=group_ids)


#: name -> ``fn(img, txt, scale: LogitScale, text_ids=None, group_ids=None) -> loss``, for local L2-normalised features.
CONTRASTIVE_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor, LogitScale], torch.Tensor]] = {
    "infonce": _infonce,
    "siglip": _siglip,
}
