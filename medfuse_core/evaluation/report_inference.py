"""Drafting reports with a trained report bundle (no Ray, no MLflow): a batch of images (and
clinical contexts) in, FINDINGS + IMPRESSION drafts out, with the bundle's decoding settings
or overrides of them."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from medfuse_core.config import ConfigError, DecodingSettings, apply_overrides
from medfuse_core.models.report import DecodingConfig, draft_reports


def decoding_settings(bundle, overrides: Sequence[str] = ()) -> DecodingSettings:
    """The bundle's decoding settings (its experiment's ``decoding`` section) with
    ``decoding.KEY=VALUE`` overrides applied; a bad key or value is a ``ConfigError``."""
    from pydantic import ValidationError

    raw = {"decoding": dict((bundle.extra or {}).get("decoding") or {})}
    bad = [o for o in overrides if not o.split("=", 1)[0].strip().startswith("decoding.")]
    if bad:
        raise ConfigError(f"{bad[0].split('=', 1)[0]}: only decoding.KEY=VALUE settings apply here "
                          "(e.g. decoding.num_beams=3)")
    raw = apply_overrides(raw, list(overrides))
    try:
        settings = DecodingSettings.model_validate(raw["decoding"])
    except ValidationError as err:
        first = err.errors()[0]
        key = "decoding." + ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{key}: {first['msg']}") from None
    check_flag_agreement(bundle, settings)
    return settings


def check_flag_agreement(bundle, settings: DecodingSettings) -> None:
    """A ``ConfigError`` when ``decoding.flag_agreement`` asks for sentences the bundle does not keep."""
    if settings.flag_agreement != "none" and (getattr(bundle.model, "guide_head", None) is None
                                              or not (bundle.extra or {}).get("flag_sentences")):
        raise ConfigError("decoding.flag_agreement: this model keeps no sentences to state its flags with (a guided "
                          "report model trained by this version of `medfuse train-report` does); "
                          "use decoding.flag_agreement=none")


def draft_batch(bundle, images: torch.Tensor, contexts: Sequence[str] | None,
                settings: DecodingSettings, flags: torch.Tensor | None = None) -> list[str]:
    """Drafts for normalised images ``[B, 1, S, S]``; ``contexts`` are used when the model was
    trained with them (``use_context``), an empty string meaning none. A guided model flags
    findings at the bundle's thresholds, or reads ``flags`` (``[B, L]``) when given; with
    ``settings.candidates > 1`` it keeps, per image, the candidate that best agrees with those
    flags (:func:`most_consistent`), and with ``settings.flag_agreement`` the draft is made to
    state them (:func:`medfuse_core.evaluation.flag_agreement.agree_with_flags`)."""
    from dataclasses import replace

    from medfuse_core.models.report import guide_flags
    from medfuse_core.objectives.report_generation import encode_context

    extra = bundle.extra or {}
    model = bundle.model
    device = next(model.parameters()).device
    images = images.to(device)
    ctx_ids = ctx_mask = None
    if extra.get("use_context") and contexts is not None:
        ctx_ids, ctx_mask = encode_context(bundle.tokenizer, list(contexts), int(extra.get("max_context_tokens", 32)))
        ctx_ids, ctx_mask = ctx_ids.to(device), ctx_mask.to(device)
    decoding = DecodingConfig(**settings.model_dump(exclude={"seed", "candidates", "flag_agreement"}))
    n_cand = settings.candidates
    if n_cand > 1 and model.guide_head is None:
        raise ConfigError("decoding.candidates: reranking needs a guided report model (model.guidance.enabled=true "
                          "when it is trained); use decoding.candidates=1")
    agreement = settings.flag_agreement
    check_flag_agreement(bundle, settings)
    torch.manual_seed(settings.seed)
    with torch.no_grad():
        if model.guide_head is not None and flags is None:
            cuts = extra.get("guide_thresholds") or {}
            _, flags = guide_flags(model, images, [cuts.get(n, 0.5) for n in model.guide_labels])
        drafts = draft_reports(model, images, bundle.tokenizer, decoding, ctx_ids, ctx_mask, flags=flags)
        if n_cand == 1:
            return state_flags(drafts, flags, model.guide_labels, extra, agreement)
        # the other candidates in one sampled pass over the batch repeated n_cand - 1 times
        rep = (lambda t: None if t is None else t.repeat_interleave(n_cand - 1, dim=0))
        torch.manual_seed(settings.seed + 1)
        more = draft_reports(model, rep(images), bundle.tokenizer, replace(decoding, do_sample=True),
                             rep(ctx_ids), rep(ctx_mask), flags=rep(flags.to(device)))
    candidates = [[drafts[i], *more[i * (n_cand - 1):(i + 1) * (n_cand - 1)]] for i in range(len(drafts))]
    chosen = most_consistent(candidates, flags, model.guide_labels)
    return state_flags(chosen, flags, model.guide_labels, extra, agreement)


def state_flags(drafts: list[str], flags, names, extra: dict, mode: str) -> list[str]:
    """``decoding.flag_agreement`` on drafts of a guided bundle (its ``extra``: mined sentences and
    thresholds): the findings it never flags are left as drafted."""
    if mode == "none":
        return drafts
    from medfuse_core.evaluation.flag_agreement import agree_with_flags
    from medfuse_core.evaluation.metrics import NEVER_FLAG

    silent = [n for n, t in (extra.get("guide_thresholds") or {}).items() if t >= NEVER_FLAG]
    return agree_with_flags(drafts, flags, names, extra["flag_sentences"], mode, abstain=silent)


def most_consistent(candidates: Sequence[Sequence[str]], flags: torch.Tensor, names: Sequence[str]) -> list[str]:
    """Per image, the candidate draft whose findings (the rule labeler's positives over ``names``)
    match most of its ``flags`` (``[B, L]`` booleans); ties keep the earlier candidate."""
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.report_labeler import LABELERS

    labeler = LABELERS.get("rules")()
    cols = [CHEXPERT_LABELS.index(n) for n in names]
    wanted = flags.cpu().numpy().astype(bool)
    out = []
    for i, texts in enumerate(candidates):
        found = labeler(list(texts))[:, cols] == 1.0
        out.append(texts[int(np.argmax((found == wanted[i]).sum(1)))])
    return out


def draft_rows(bundle, rows: dict, settings: DecodingSettings) -> list[str]:
    """Drafts for a columnar batch of shard rows (``image``, ``image_size``, optional ``context``)."""
    from medfuse_core.data.batching import blobs_to_tensor

    images = blobs_to_tensor(rows["image"], rows["image_size"], bundle.image_size)
    contexts = [c if isinstance(c, str) else "" for c in rows["context"]] if "context" in rows else None
    return draft_batch(bundle, images, contexts, settings)


def draft_images(bundle, pixels: Sequence[np.ndarray], contexts: Sequence[str] | None,
                 settings: DecodingSettings) -> list[str]:
    """Drafts for decoded ``[0, 1]`` images (e.g. from :func:`medfuse_core.data.dicom.decode_dicom`)."""
    from medfuse_core.data.batching import images_to_tensor

    return draft_batch(bundle, images_to_tensor(pixels, bundle.image_size), contexts, settings)
