"""Stage 2: fine-tune the fusion classifier (objective ``bce``) on the shared training driver.

``init_from`` starts from a stage-1 model's encoders; ``data.label_fraction`` trains on a
seeded, patient-level share of the labelled training images. See :mod:`pipelines.training`
for the workdir layout and resume.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from medfuse_core.config import FinetuneConfig
from medfuse_core.data.sources import SourceError
from pipelines.calibrate import calibrate_model
from pipelines.ingest import load_summary
from pipelines.shards import DIAGNOSIS_COLUMNS, count_fraction, read_fraction, read_split
from pipelines.training import (check_image_size, config_changes, find_checkpoints, prepare_init_from,  # noqa: F401
                                run_training)

log = logging.getLogger("medfuse")

STATE_FILE = "finetune.json"


def _datasets(data_dir: Path, cfg: FinetuneConfig):
    """Train (streamed, a new order every epoch) and validate (streamed) datasets, labelled rows
    and the diagnosis columns only.

    ``train.shuffle``: ``files`` (default) reads the shard files in a new seeded order every
    epoch and workers mix rows in a local shuffle buffer; nothing is moved between workers and
    memory stays flat, at the price of a shuffle only as good as the buffer (ingest writes
    studies in a seeded random order, so each file is already a random sample). ``full`` adds
    Ray's all-to-all ``random_shuffle`` of the projected columns, reseeded every epoch: an
    exact shuffle that moves every image through the object store each epoch.
    """
    from ray.data._internal.random_config import RandomSeedConfig

    from pipelines.runtime import quiet_data_progress

    quiet_data_progress()
    seed = cfg.train.seed
    train = read_fraction(data_dir, "train", DIAGNOSIS_COLUMNS, cfg.data.label_fraction, seed,
                          labelled_only=True, shuffle_seed=seed)
    if cfg.train.shuffle == "full":
        train = train.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return {"train": train,
            "validate": read_split(data_dir, "validate", DIAGNOSIS_COLUMNS, labelled_only=True)}


def check_data(cfg: FinetuneConfig, summary: dict, data_dir: str | Path | None = None) -> tuple[int, int]:
    """Refuse data that cannot train this config; returns the labelled (train, validate) image
    counts (train: inside ``data.label_fraction``)."""
    labelled = summary.get("labelled_images_per_split", summary["splits"])
    n_train, n_val = labelled.get("train", 0), labelled.get("validate", 0)
    if cfg.data.label_fraction < 1.0 and data_dir is not None:
        n_train = count_fraction(data_dir, "train", cfg.data.label_fraction, cfg.train.seed)["images"]
    if n_train < cfg.scaling.num_workers * cfg.train.batch_size:
        what = (f"{n_train} labelled training images (data.label_fraction={cfg.data.label_fraction})"
                if cfg.data.label_fraction < 1.0 else f"{n_train} labelled training images")
        raise SourceError(f"--data: {what} are too few for "
                          f"scaling.num_workers x train.batch_size = {cfg.scaling.num_workers * cfg.train.batch_size}")
    if n_val == 0:
        raise SourceError("--data: the validate split has no labelled images")
    positives = summary.get("label_positives", {}).get("train", {})
    if not any(positives.get(name, 0) for name in cfg.data.labels):
        raise SourceError("--data: none of the configured labels (data.labels) has a positive example in the "
                          "train split, so there is nothing to learn; check the label table the data was "
                          "ingested from (ingest_summary.json: label_positives)")
    missing = [name for name in cfg.data.labels if not positives.get(name, 0)]
    if missing:
        log.warning("finetune: %d configured labels have no positive in the train split: %s",
                    len(missing), ", ".join(missing))
    check_image_size(cfg, summary)
    return n_train, n_val


def run(cfg: FinetuneConfig, data_dir: str | Path, workdir: str | Path, context=None) -> dict:
    """Train (or resume) and log/register the best model; returns the run facts."""
    data_dir = Path(data_dir)
    summary = load_summary(data_dir)
    n_train, n_val = check_data(cfg, summary, data_dir)
    with tempfile.TemporaryDirectory(prefix="medfuse-init-") as tmp:
        loop_extra, tags, lineage = prepare_init_from(
            cfg, workdir, Path(tmp), [("vision.name", cfg.model.vision.name),
                                      ("vision.in_channels", cfg.model.vision.in_channels),
                                      ("text.name_or_path", cfg.model.text.name_or_path)])
        if cfg.data.label_fraction < 1.0:
            tags["medfuse.label_fraction"] = str(cfg.data.label_fraction)
        return run_training("finetune", cfg, data_dir, workdir, summary=summary,
                            datasets_fn=lambda: _datasets(data_dir, cfg), n_train=n_train, n_val=n_val,
                            loop_extra=loop_extra, tags=tags, facts_extra={"lineage": lineage, "n_train": n_train},
                            params_extra={"data.n_train_images": n_train}, context=context,
                            finalize_model=lambda model_dir: calibrate_model(model_dir, data_dir))


def load_facts(workdir: str | Path) -> dict:
    """``W/finetune.json`` of a fine-tuning workdir."""
    return json.loads((Path(workdir) / STATE_FILE).read_text())
