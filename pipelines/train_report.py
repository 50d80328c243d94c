"""Report generation training (objective ``report_lm``) on the shared training driver.

Every training image with a de-identified FINDINGS or IMPRESSION trains, labelled or not;
``init_from`` starts from a stage-1 model's vision encoder or an earlier report model (the
common recipe: train the connector with the LM frozen, then continue with LoRA adapters).
See :mod:`pipelines.training` for the workdir layout and resume.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from medfuse_core.config import ReportConfig
from medfuse_core.data.sources import SourceError
from pipelines.ingest import load_summary
from pipelines.training import check_image_size, objective_datasets, prepare_init_from, run_training

STATE_FILE = "report.json"
log = logging.getLogger("medfuse")


def check_data(cfg: ReportConfig, summary: dict) -> tuple[int, int]:
    """Refuse data that cannot train this config; returns the (train, validate) image counts."""
    n_train, n_val = summary["splits"].get("train", 0), summary["splits"].get("validate", 0)
    need = cfg.scaling.num_workers * cfg.train.batch_size
    if n_train < need:
        raise SourceError(f"--data: {n_train} training images are too few for scaling.num_workers x "
                          f"train.batch_size = {need}")
    if n_val < 1:
        raise SourceError("--data: the validate split has no images to score the drafts on")
    check_image_size(cfg, summary)
    return n_train, n_val


def run(cfg: ReportConfig, data_dir: str | Path, workdir: str | Path, context=None) -> dict:
    """Train (or resume) a report generator; log and register the best model; returns the run facts."""
    data_dir = Path(data_dir)
    summary = load_summary(data_dir)
    n_train, n_val = check_data(cfg, summary)
    with tempfile.TemporaryDirectory(prefix="medfuse-init-") as tmp:
        loop_extra, tags, lineage = prepare_init_from(
            cfg, workdir, Path(tmp), [("vision.name", cfg.model.vision.name),
                                      ("vision.in_channels", cfg.model.vision.in_channels),
                                      ("lm.name_or_path", cfg.model.lm.name_or_path)])
        return run_training("report", cfg, data_dir, workdir, summary=summary,
                            datasets_fn=lambda: objective_datasets(data_dir, cfg), n_train=n_train, n_val=n_val,
                            loop_extra=loop_extra, tags=tags, facts_extra={"lineage": lineage},
                            context=context, finalize_model=lambda model_dir: finalize(model_dir, data_dir))


def finalize(model_dir: Path, data_dir: Path) -> tuple[dict, dict]:
    """A guided model's flag thresholds, chosen on validation (the F1-best point per finding;
    never flagged where the head's validate AUROC is under ``guidance.min_auroc``), and the
    training reports' sentences that state each finding (for ``decoding.flag_agreement``), stored
    in the bundle's ``extra`` (``guide_thresholds``, ``flag_sentences``); returns ``(metrics, figures)``."""
    import numpy as np

    from medfuse_core.config import GuidanceConfig
    from medfuse_core.evaluation.metrics import NEVER_FLAG, choose_thresholds, multilabel_metrics
    from medfuse_core.models.bundle import load_bundle, read_bundle_meta, update_bundle_extra

    meta = read_bundle_meta(model_dir)
    guidance = GuidanceConfig(**((meta.get("model_config") or {}).get("guidance") or {}))
    if not guidance.enabled:
        return {}, {}
    names = list(guidance.labels)
    bundle = load_bundle(model_dir)
    sentences = flag_sentences(bundle, data_dir, names)
    update_bundle_extra(model_dir, {"flag_sentences": sentences})
    log.info("flag agreement: sentences stating %d of %d findings mined from the training reports",
             len({n for e in sentences["findings"] + sentences["impression"] for n in e["labels"]}), len(names))
    probs, labels = guide_scores(bundle, data_dir, "validate")
    if len(probs) == 0:
        log.warning("guidance: no labelled validate rows; drafts flag findings at probability 0.5")
        return {}, {}
    thresholds = choose_thresholds(probs, labels, min_auroc=guidance.min_auroc)
    silent = [n for n, t in zip(names, thresholds) if t == NEVER_FLAG]
    if silent:
        log.info("guidance: never flagged (validate AUROC under %.2f): %s", guidance.min_auroc, ", ".join(silent))
    update_bundle_extra(model_dir, {"guide_thresholds": {n: float(t) for n, t in zip(names, thresholds)}})
    m = multilabel_metrics(probs, labels, names, thresholds)
    log.info("guidance on %d validate images: macro AUROC %.3f, macro F1 %.3f at the chosen thresholds",
             len(probs), m["auroc_macro"], m["f1_macro"])
    metrics = {"val/guide/auroc_macro": m["auroc_macro"], "val/guide/f1_macro": m["f1_macro"],
               "val/guide/n": float(len(probs)), "val/guide/never_flagged": float(len(silent))}
    return {k: v for k, v in metrics.items() if v == v and np.isfinite(v)}, {}


def flag_sentences(bundle, data_dir: Path, names, max_reports: int = 20000) -> dict:
    """The sentences of the first ``max_reports`` training rows' reports that state each set of
    findings, counted by patient (:func:`medfuse_core.evaluation.flag_agreement.mine_flag_sentences`),
    written as the LM writes (its tokenizer's round trip)."""
    from medfuse_core.evaluation.flag_agreement import mine_flag_sentences
    from pipelines.shards import read_split_table

    table = read_split_table(data_dir, "train", ["report", "patient_id"], limit=max_reports)
    reports = table.column("report").to_pylist() if table is not None else []
    patients = table.column("patient_id").to_pylist() if table is not None else []
    tok = bundle.tokenizer

    def style(sentence: str) -> str:
        return tok.decode(tok(sentence, add_special_tokens=False)["input_ids"], skip_special_tokens=True).strip()

    return mine_flag_sentences(reports, names, patients, style=style, max_reports=max_reports)


def guide_scores(bundle, data_dir: Path, split: str):
    """The guidance head's probabilities and the labels (positive 1, else 0) of a split's
    labelled images (of a loaded report bundle), streamed through the driver a batch at a time."""
    import numpy as np
    import torch

    from medfuse_core.data.batching import blobs_to_tensor
    from medfuse_core.models.report import guide_flags
    from medfuse_core.objectives.report_generation import guide_batch
    from pipelines.shards import read_split

    names = list(bundle.model.guide_labels)
    probs, labels = [], []
    ds = read_split(data_dir, split, ["image", "image_size", "labels", "labelled"], labelled_only=True)
    for rows in ds.iter_batches(batch_size=64, batch_format="numpy"):
        images = blobs_to_tensor(rows["image"], rows["image_size"], bundle.image_size)
        with torch.no_grad():
            p, _ = guide_flags(bundle.model, images)
        probs.append(p.numpy())
        labels.append(guide_batch(rows, bundle.tokenizer, names)["guide_targets"].numpy())
    if not probs:
        return np.zeros((0, len(names))), np.zeros((0, len(names)))
    return np.concatenate(probs), np.concatenate(labels)
