"""The model card (Markdown) logged with every registered model: what it was trained on, how it
scored on validation, what it is for and what it must not be used for. Ids and counts only:
no patient data."""

from __future__ import annotations

from pathlib import Path

KIND_USE = {
    "diagnosis": ("Multi-label finding probabilities for frontal chest radiographs (PA/AP), image-only or with the "
                  "study's clinical indication, as a second reader or a worklist triage aid."),
    "contrastive": "Image and report embeddings (stage 1) for retrieval and as a starting point for fine-tuning.",
    "report": "Draft FINDINGS and IMPRESSION text for a radiologist to edit and sign.",
}
LIMITS = [
    "Not a medical device; not validated for clinical use. Every output needs a qualified reader's review.",
    "Trained on the data named below only; performance on other sites, scanners, populations, views "
    "(lateral images are filtered out by default) or paediatric patients is unknown.",
    "Labels come from report text (CheXpert conventions): they inherit the labeler's and the reports' errors.",
    "The clinical context is the indication only; a context that states findings is refused at ingest.",
]


def model_card(meta: dict, facts: dict, summary: dict | None) -> str:
    """The card's Markdown from the bundle's metadata, the run facts and the ingest summary."""
    kind = meta.get("kind", "diagnosis")
    extra = meta.get("extra") or {}
    cfg = meta.get("model_config") or {}
    lines = [f"# Model card: {extra.get('experiment', 'medfuse')} ({kind})", "",
             "## Intended use", "", KIND_USE.get(kind, ""), "", "## Model", "",
             f"- kind: `{kind}`, objective `{extra.get('objective', '')}`, image size {meta.get('image_size')} px",
             f"- vision encoder: `{(cfg.get('vision') or {}).get('name')}`"]
    text = cfg.get("lm") or cfg.get("text") or {}
    lines.append(f"- language model: `{text.get('name_or_path', 'none')}`")
    if cfg.get("fusion"):
        lines.append(f"- fusion: `{cfg['fusion'].get('name')}`")
    if meta.get("label_names"):
        lines.append(f"- findings: {', '.join(meta['label_names'])}")
    lines += ["", "## Data", ""]
    if summary:
        lines += [f"- dataset digest `{summary.get('digest', '')[:16]}…`, format `{summary.get('format')}`",
                  f"- images per split: {summary.get('splits')}",
                  f"- records: {summary.get('n_records')} ({summary.get('n_quarantined')} quarantined, "
                  f"{summary.get('n_filtered')} filtered)"]
    lines += [f"- blank-label policy `{extra.get('blank_policy', 'n/a')}`, uncertain-label policy "
              f"`{extra.get('uncertain_policy', 'n/a')}`", "", "## Validation", ""]
    lines.append(f"- checkpoint score `{extra.get('score_key', '')}` = {extra.get('score', float('nan')):.4f} "
                 f"(epoch {extra.get('epoch', '?')})" if isinstance(extra.get("score"), (int, float)) else "- no score")
    cal = extra.get("calibration")
    if cal:
        lines.append(f"- probabilities temperature-scaled per finding and mode on {cal.get('n')} validate images; "
                     "operating points (pred) F1-best on validation")
    lines += ["- test metrics: `medfuse evaluate` logs them to this run (`test/...`)", "",
              "## Limits", "", *[f"- {item}" for item in LIMITS], "",
              f"Training run: `{facts.get('mlflow_run_id', '')}`."]
    return "\n".join(lines) + "\n"


def write_model_card(bundle_dir: Path, facts: dict, summary: dict | None) -> Path:
    """Write ``MODEL_CARD.md`` into the bundle folder (it travels with the model)."""
    from medfuse_core.models.bundle import read_bundle_meta

    path = Path(bundle_dir) / "MODEL_CARD.md"
    path.write_text(model_card(read_bundle_meta(bundle_dir), facts, summary))
    return path
