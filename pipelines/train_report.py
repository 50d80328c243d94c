"""Report generation training (objective ``report_lm``) on the shared training driver.

Every training image with a de-identified FINDINGS or IMPRESSION trains, labelled or not;
``init_from`` starts from a stage-1 model's vision encoder or an earlier report model (the
common recipe: train the connector with the LM frozen, then continue with LoRA adapters).
See :mod:`pipelines.training` for the workdir layout and resume.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from medfuse_core.config import ReportConfig
from medfuse_core.data.sources import SourceError
from pipelines.ingest import load_summary
from pipelines.training import check_image_size, objective_datasets, prepare_init_from, run_training

STATE_FILE = "report.json"


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
                            context=context)
