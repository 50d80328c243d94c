"""Stage 1 (image-report alignment): the contrastive objectives ``infonce`` and ``siglip``.

The image is paired with its de-identified report's FINDINGS + IMPRESSION (``data.text_sections``).
Validation embeds every validate image and report and reports retrieval recall (label-free:
the checkpoint score is the mean of image->text and text->image R@1/5/10) and, when the rows
carry labels and a prompt file is set, zero-shot AUROC per finding.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch

from medfuse_core.objectives.base import Objective
from medfuse_core.objectives.contrastive import infonce_loss, siglip_loss
from medfuse_core.objectives.registry import OBJECTIVES


def report_text(report: str, sections=("findings", "impression")) -> str:
    """The named sections of a de-identified report, in order, joined by a space ('' if none)."""
    from medfuse_core.data.reports import extract_sections

    found = extract_sections(report or "")
    return " ".join(found[s] for s in sections if found.get(s))


_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=\S)")


def report_sentences(text: str) -> list[str]:
    """The sentences of a report text (split after ``.``, ``!``, ``?`` or ``;``), empty ones dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text or "") if len(s.strip()) > 1]


def sample_sentences(texts: list[str], generator: torch.Generator) -> list[str]:
    """One sentence drawn at random from each text (ConVIRT's text augmentation); '' stays ''."""
    out = []
    draws = torch.rand(len(texts), generator=generator).tolist()
    for text, u in zip(texts, draws):
        sentences = report_sentences(text)
        out.append(sentences[min(int(u * len(sentences)), len(sentences) - 1)] if sentences else text)
    return out


def text_key(text: str) -> str:
    """A digest of the normalised report text: equal reports retrieve each other (never the text)."""
    return hashlib.sha1(" ".join(text.lower().split()).encode()).hexdigest()


def findings_id(text: str) -> int:
    """A signed 64-bit digest of the findings the rule report labeler reads in ``text`` as present
    or uncertain ("No Finding" when none): reports that read alike share it."""
    from medfuse_core.evaluation.report_labeler import NEGATIVE, label_report

    reading = sorted(k for k, v in label_report(text).items() if v is not None and v != NEGATIVE)
    return int.from_bytes(hashlib.blake2b("|".join(reading).encode(), digest_size=8).digest(), "little", signed=True)


def text_id(text: str) -> int:
    """A signed 64-bit digest of the normalised text (equal texts, equal ids): the loss's duplicate test."""
    return int.from_bytes(hashlib.blake2b(" ".join(text.lower().split()).encode(), digest_size=8).digest(),
                          "little", signed=True)


class AlignmentObjective(Objective):
    """Shared by the contrastive losses; subclasses name the loss."""

    stage = "pretrain"
    columns = ("image", "image_size", "report", "labels", "labelled")
    labelled_only = False
    score_key = "val/retrieval_mean_recall"

    def __init__(self, cfg):
        super().__init__(cfg)
        self._prompt_emb = None

    def build_model(self):
        """The :class:`~medfuse_core.models.contrastive.ContrastiveModel` of ``cfg.model``."""
        from medfuse_core.models.contrastive import build_contrastive_model

        return build_contrastive_model(self.cfg.model, self.cfg.data.image_size, self.name,
                                       init_temperature=self.cfg.objective.init_temperature)

    def make_batch(self, rows, tokenizer, *, train, generator):
        """Images (augmented in training), tokenised report text, zero-shot targets, text keys."""
        from medfuse_core.data.batching import augment, blobs_to_tensor, label_indices, tokenize
        from medfuse_core.data.labels import evaluation_targets

        d = self.cfg.data
        images = blobs_to_tensor(rows["image"], rows["image_size"], d.image_size)
        if train and d.augment:
            images = augment(images, generator)
        texts = [report_text(r if isinstance(r, str) else "", d.text_sections) for r in rows["report"]]
        if train and d.text_sampling == "sentence":
            texts = sample_sentences(texts, generator)
        enc = tokenize(tokenizer, texts, self.cfg.model.text.max_tokens)
        batch = {"images": images, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "text_ids": torch.tensor([text_id(t) for t in texts], dtype=torch.int64)}
        if train and self.cfg.objective.positives == "findings":
            batch["group_ids"] = torch.tensor([findings_id(t) for t in texts], dtype=torch.int64)
        if not train:
            raw = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])[:, label_indices(d.labels)]
            y = evaluation_targets(raw, d.blank_policy)
            if "labelled" in rows:
                y[~np.asarray(rows["labelled"], dtype=bool)] = np.nan
            batch["eval_labels"] = torch.from_numpy(y)
            batch["text_keys"] = [text_key(t) for t in texts]
        return batch

    def _contrastive(self, out, text_ids, group_ids) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, batch):
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        ids = batch.get("text_ids") if self.cfg.objective.mask_duplicate_texts else None
        groups = batch.get("group_ids")
        device = out["image"].device
        return self._contrastive(out, None if ids is None else ids.to(device),
                                 None if groups is None else groups.to(device))

    # -- validation

    def prompts_path(self) -> Path | None:
        """The zero-shot prompt file: ``data.prompts``, else the repository's default (None if absent)."""
        from medfuse_core.evaluation.zero_shot import PromptError, default_prompts_path

        if self.cfg.data.prompts:
            return Path(self.cfg.data.prompts)
        try:
            return default_prompts_path()
        except PromptError:
            return None

    def eval_begin(self, model, tokenizer, device):
        from medfuse_core.data.batching import tokenize
        from medfuse_core.evaluation.zero_shot import load_prompts, prompt_embeddings

        path = self.prompts_path()
        if path is None:
            self._prompt_emb = None
            return
        prompts = {k: v for k, v in load_prompts(path).items() if k in self.cfg.data.labels}

        core = getattr(model, "module", model)  # submodule hooks still gather ZeRO-3 parameters

        def encode(texts):
            enc = tokenize(tokenizer, texts, self.cfg.model.text.max_tokens)
            with torch.no_grad():
                emb = core.encode_texts(enc["input_ids"].to(device), enc["attention_mask"].to(device))
            return emb.float().cpu().numpy()

        self._prompt_emb = prompt_embeddings(prompts, encode)

    def eval_outputs(self, model, batch):
        out = model(batch["images"], batch["input_ids"], batch["attention_mask"])
        return {"image": out["image"].float().cpu().numpy(), "text": out["text"].float().cpu().numpy(),
                "labels": batch["eval_labels"].cpu().numpy(), "keys": np.asarray(batch["text_keys"]),
                "scale": np.full(len(batch["text_keys"]), float(out["scale"]), np.float32)}

    def val_metrics(self, outputs):
        from medfuse_core.evaluation.retrieval import recall_at_k
        from medfuse_core.evaluation.zero_shot import zero_shot_metrics, zero_shot_scores

        r = recall_at_k(outputs["image"], outputs["text"], text_keys=list(outputs["keys"]))
        metrics = {f"val/retrieval/{d}/{k.replace('@', '_at_')}": v
                   for d in ("image_to_text", "text_to_image") for k, v in r[d].items()}
        metrics[self.score_key] = float(np.mean([v for d in ("image_to_text", "text_to_image")
                                                 for v in r[d].values()]))
        metrics["val/logit_scale"] = float(outputs["scale"][0]) if len(outputs["scale"]) else float("nan")
        if self._prompt_emb is not None:
            scores = zero_shot_scores(outputs["image"], *self._prompt_emb)
            zs = zero_shot_metrics(scores, outputs["labels"], list(self.cfg.data.labels))
            metrics["val/zero_shot_auroc_macro"] = zs["auroc_macro"]
            for label, value in zs["auroc"].items():
                metrics[f"val/zero_shot_auroc/{label.replace(' ', '_')}"] = value
        return metrics

    def bundle_extra(self):
        return {"objective": self.name, "text_sections": list(self.cfg.data.text_sections),
                "blank_policy": self.cfg.data.blank_policy}


@OBJECTIVES.register("infonce")
class InfoNCEObjective(AlignmentObjective):
    """CLIP / ConVIRT symmetric InfoNCE with a learnable temperature over the global batch."""

    name = "infonce"

    def _contrastive(self, out, text_ids, group_ids):
        return infonce_loss(out["image"], out["text"], out["scale"], text_ids, group_ids)


@OBJECTIVES.register("siglip")
class SigLIPObjective(AlignmentObjective):
    """SigLIP's pairwise sigmoid loss with a learnable temperature and bias."""

    name = "siglip"

    def _contrastive(self, out, text_ids, group_ids):
        return siglip_loss(out["image"], out["text"], out["scale"], out["bias"], text_ids, group_ids)
