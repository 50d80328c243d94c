"""Report generation: teacher-forced next-token cross-entropy on the de-identified report
(``report_lm``), the image (and the clinical context, when there is one) as the condition.

The target is ``FINDINGS: ... IMPRESSION: ...`` (``data.text_sections``, each under its header)
followed by the end-of-sequence token; only its tokens are scored. Validation is teacher-forced
too: per-token loss, perplexity and next-token accuracy (the checkpoint score); drafts and their
clinical accuracy come from ``medfuse evaluate`` on the trained model.

With ``model.guidance.enabled``, the study's positive labels (1.0; uncertain and blank are not
flagged) are the LM's ``Flagged: ...`` prompt, and the guidance head trains on them with a
masked BCE (unlabelled studies: no prompt, no BCE), weighted by ``guidance.loss_weight``.
Validation adds the head's macro AUROC (``val/guide_auroc_macro``).
"""

from __future__ import annotations

import numpy as np
import torch

from medfuse_core.objectives.base import Objective
from medfuse_core.objectives.registry import OBJECTIVES


def report_tokenizer(name_or_path: str):
    """The LM's tokenizer with an end-of-sequence and a padding token (a BERT-class tokenizer
    ends with ``[SEP]``; one without padding pads with its end token: padding is masked)."""
    from medfuse_core.models.text import load_tokenizer

    tokenizer = load_tokenizer(name_or_path)
    if tokenizer.eos_token is None:
        tokenizer.eos_token = tokenizer.sep_token or tokenizer.pad_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_targets(tokenizer, texts: list[str], max_tokens: int) -> dict[str, torch.Tensor]:
    """Target token ids (no special tokens but a final end token; truncated texts keep no end
    token, so the model does not learn to stop mid-report), right-padded, with their mask."""
    enc = tokenizer(list(texts), add_special_tokens=False, truncation=True, max_length=max_tokens)
    rows = [ids + [tokenizer.eos_token_id] if len(ids) < max_tokens else ids for ids in enc["input_ids"]]
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for k, row in enumerate(rows):
        ids[k, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[k, :len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def encode_context(tokenizer, texts: list[str], max_tokens: int, keep: torch.Tensor | None = None):
    """Clinical-context token ids ``"Indication: <text>"`` without special tokens; empty (all
    masked) where there is no context or ``keep`` is False."""
    texts = [t.strip() if isinstance(t, str) else "" for t in texts]
    if keep is not None:
        texts = [t if k else "" for t, k in zip(texts, keep.tolist())]
    enc = tokenizer([f"Indication: {t}" if t else "" for t in texts], add_special_tokens=False, truncation=True,
                    max_length=max_tokens, padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@OBJECTIVES.register("report_lm")
class ReportObjective(Objective):
    """Teacher-forced report generation (see the module docstring)."""

    name = "report_lm"
    stage = "report"
    columns = ("image", "image_size", "report", "context", "labels", "labelled")
    labelled_only = False
    score_key = "val/token_accuracy"

    def build_model(self):
        """The :class:`~medfuse_core.models.report.ReportGenerator` of ``cfg.model``."""
        from medfuse_core.models.report import build_report_model

        return build_report_model(self.cfg.model, self.cfg.data.image_size)

    def initial_model(self, init_from: str | None):
        """The model, with ``init_from``'s tensors (a stage-1 vision encoder, or an earlier report
        model's vision encoder, connector and LM) copied in before freezing and LoRA."""
        if not init_from:
            return self.build_model(), 0
        from medfuse_core.models.report import build_report_model

        state = report_init_state(init_from)
        return build_report_model(self.cfg.model, self.cfg.data.image_size, init_state=state), len(state)

    def tokenizer(self):
        return report_tokenizer(self.cfg.model.lm.name_or_path)

    def make_batch(self, rows, tokenizer, *, train, generator):
        """Images (augmented in training), the target report tokens, the context tokens."""
        from medfuse_core.data.batching import augment, blobs_to_tensor
        from medfuse_core.data.reports import extract_sections
        from medfuse_core.models.report import report_target

        d = self.cfg.data
        images = blobs_to_tensor(rows["image"], rows["image_size"], d.image_size)
        if train and d.augment:
            images = augment(images, generator)
        targets = [report_target(extract_sections(r if isinstance(r, str) else ""), d.text_sections)
                   for r in rows["report"]]
        batch = {"images": images, **encode_targets(tokenizer, targets, d.max_report_tokens)}
        if d.use_context:
            keep = (torch.rand(len(targets), generator=generator) >= d.context_dropout) if train else None
            batch["context_ids"], batch["context_mask"] = encode_context(
                tokenizer, list(rows["context"]), d.max_context_tokens, keep)
        if self.cfg.model.guidance.enabled:
            batch.update(guide_batch(rows, tokenizer, self.cfg.model.guidance.labels))
        return batch

    @staticmethod
    def _forward(model, batch):
        return model(batch["images"], batch["input_ids"], batch["attention_mask"],
                     context_ids=batch.get("context_ids"), context_mask=batch.get("context_mask"),
                     guide_ids=batch.get("guide_ids"), guide_mask=batch.get("guide_mask"))

    def _guide_loss(self, out, batch):
        from medfuse_core.objectives.diagnosis import masked_bce_with_logits

        return masked_bce_with_logits(out["guide_logits"], batch["guide_targets"], batch["guide_weights"])

    def loss(self, model, batch):
        out = self._forward(model, batch)
        if "guide_logits" not in out:
            return out["loss"]
        return out["loss"] + self.cfg.model.guidance.loss_weight * self._guide_loss(out, batch)

    def eval_outputs(self, model, batch):
        out = self._forward(model, batch)
        logits, labels = out["logits"][:, :-1].float(), out["labels"][:, 1:]
        scored = labels != -100
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        correct = (logits.argmax(-1) == labels) & scored
        result = {"nll": (nll * scored).sum(1).cpu().numpy(), "tokens": scored.sum(1).cpu().numpy(),
                  "correct": correct.sum(1).cpu().numpy()}
        if "guide_logits" in out:
            result["guide_probs"] = torch.sigmoid(out["guide_logits"].float()).cpu().numpy()
            y = batch["guide_targets"].clone()
            y[batch["guide_weights"] == 0] = float("nan")
            result["guide_labels"] = y.cpu().numpy()
        return result

    def val_metrics(self, outputs):
        tokens = float(np.sum(outputs["tokens"]))
        loss = float(np.sum(outputs["nll"]) / max(tokens, 1.0))
        metrics = {"val/loss": loss, "val/perplexity": float(np.exp(min(loss, 50.0))),
                   "val/token_accuracy": float(np.sum(outputs["correct"]) / max(tokens, 1.0))}
        if "guide_probs" in outputs:
            from medfuse_core.evaluation.metrics import multilabel_metrics

            m = multilabel_metrics(outputs["guide_probs"], outputs["guide_labels"], self.cfg.model.guidance.labels)
            metrics["val/guide_auroc_macro"] = m["auroc_macro"]
        return metrics

    def bundle_extra(self):
        return {"objective": self.name, "text_sections": list(self.cfg.data.text_sections),
                "use_context": self.cfg.data.use_context, "max_context_tokens": self.cfg.data.max_context_tokens,
                "decoding": self.cfg.decoding.model_dump()}


def guide_batch(rows, tokenizer, names) -> dict[str, torch.Tensor]:
    """Guidance targets (positive = 1.0), weights (0 for unlabelled studies) and the prompt tokens
    that flag each labelled study's positives."""
    from medfuse_core.data.batching import label_indices
    from medfuse_core.models.report import encode_guides

    raw = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])[:, label_indices(names)]
    positive = raw == 1.0
    labelled = (np.asarray(rows["labelled"], dtype=bool) if "labelled" in rows
                else np.ones(len(raw), dtype=bool))
    ids, mask = encode_guides(tokenizer, names, positive, present=labelled)
    weights = np.repeat(labelled[:, None], len(names), axis=1).astype(np.float32)
    return {"guide_targets": torch.from_numpy(positive.astype(np.float32)), "guide_weights": torch.from_numpy(weights),
            "guide_ids": ids, "guide_mask": mask}


REPORT_PREFIXES = ("vision_encoder.", "connector.", "lm.", "guide_head.")


def report_init_state(bundle_dir: str) -> dict[str, torch.Tensor]:
    """The tensors a report model starts from: a stage-1 or diagnosis bundle gives its vision
    encoder; a report bundle its vision encoder, connector and LM (a LoRA-trained one cannot be
    the start of another run: its adapters are not merged)."""
    import os

    from safetensors.torch import load_file

    from medfuse_core.models.bundle import WEIGHTS_FILE, read_bundle_meta

    meta = read_bundle_meta(bundle_dir)
    state = load_file(os.path.join(bundle_dir, WEIGHTS_FILE))
    if meta.get("kind") != "report":
        return {k: v for k, v in state.items() if k.startswith("vision_encoder.")}
    if meta.get("model_config", {}).get("lm", {}).get("lora", {}).get("r", 0):
        raise ValueError("init_from: this report model trained LoRA adapters; start from the model it was "
                         "initialised from, or train it without model.lm.lora")
    return {k: v for k, v in state.items() if k.startswith(REPORT_PREFIXES)}
