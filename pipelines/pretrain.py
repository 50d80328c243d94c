"""Stage 1: image-report contrastive pretraining (objective ``infonce`` or ``siglip``) on the
shared training driver (:mod:`pipelines.training`).

Every training image with its de-identified FINDINGS + IMPRESSION trains, labelled or not;
validation reports retrieval recall (the checkpoint score) and zero-shot AUROC.
"""

from __future__ import annotations

from pathlib import Path

from medfuse_core.config import PretrainConfig
from medfuse_core.data.sources import SourceError
from pipelines.ingest import load_summary
from pipelines.training import check_image_size, objective_datasets, run_training

STATE_FILE = "pretrain.json"


def check_data(cfg: PretrainConfig, summary: dict) -> tuple[int, int]:
    """Refuse data that cannot train this config; returns the (train, validate) image counts."""
    n_train, n_val = summary["splits"].get("train", 0), summary["splits"].get("validate", 0)
    need = cfg.scaling.num_workers * cfg.train.batch_size
    if n_train < need:
        raise SourceError(f"--data: {n_train} training images are too few for scaling.num_workers x "
                          f"train.batch_size = {need}")
    if n_val < 2:
        raise SourceError("--data: the validate split needs at least 2 images to score retrieval")
    check_image_size(cfg, summary)
    return n_train, n_val


def run(cfg: PretrainConfig, data_dir: str | Path, workdir: str | Path, context=None) -> dict:
    """Pretrain (or resume) and log/register the best stage-1 model; returns the run facts."""
    data_dir = Path(data_dir)
    summary = load_summary(data_dir)
    n_train, n_val = check_data(cfg, summary)
    return run_training("pretrain", cfg, data_dir, workdir, summary=summary,
                        datasets_fn=lambda: objective_datasets(data_dir, cfg), n_train=n_train, n_val=n_val,
                        context=context)
