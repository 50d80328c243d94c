"""Stage 2: fine-tune the fusion classifier with Ray Train + DeepSpeed, tracked in MLflow.

Workdir layout::

    W/ray/<run>/checkpoint_*/      Ray Train checkpoints (DeepSpeed shards, bundle/, train_state.json)
    W/model/                       the best checkpoint's self-contained model bundle
    W/finetune.json                run facts: MLflow run id, best score, resumed-from
    W/mlflow.db, W/mlartifacts/    the embedded MLflow store (unless MLFLOW_TRACKING_URI is set)

Re-running with the same workdir resumes from the latest checkpoint found there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from medfuse_core.config import ConfigError, FinetuneConfig, flatten
from medfuse_core.sources import SourceError
from pipelines import tracking
from pipelines.ingest import load_summary
from pipelines.shards import DIAGNOSIS_COLUMNS, read_split
from pipelines.train_loop import BUNDLE_DIR, RANKS_DIR, TRAIN_STATE, train_loop_per_worker

log = logging.getLogger("medfuse")

STATE_FILE = "finetune.json"


def _complete(state: dict, folder: Path) -> bool:
    """Rank 0's bundle and state, and every rank's manifest with every file it lists, arrived.

    Each rank writes its manifest after DeepSpeed's save returned, listing the files it wrote
    with their sizes: a checkpoint cut short by a crash lacks a manifest or a file and is skipped.
    """
    if not (folder / BUNDLE_DIR / "medfuse_model.json").is_file():
        return False
    for rank in range(int(state.get("world_size", 1))):
        manifest = folder / RANKS_DIR / f"rank-{rank}.json"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError):
            return False
        for rel, size in files.items():
            f = folder / rel
            if not f.is_file() or f.stat().st_size != size:
                return False
    return True


def find_checkpoints(workdir: Path) -> list[tuple[dict, Path]]:
    """Every complete checkpoint under ``workdir/ray`` with its train state, oldest step first."""
    found = []
    for state_file in (workdir / "ray").glob(f"*/checkpoint_*/{TRAIN_STATE}"):
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            continue
        if _complete(state, state_file.parent):
            found.append((state, state_file.parent))
    return sorted(found, key=lambda item: item[0]["global_step"])


RESUMABLE_CHANGES = ("train.epochs", "train.log_every_steps")


def config_changes(previous: dict, cfg: FinetuneConfig) -> list[str]:
    """Dotted keys whose values differ from the run being resumed (epochs may grow)."""
    old, new = flatten(previous), flatten(cfg)
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k))


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
    train = read_split(data_dir, "train", DIAGNOSIS_COLUMNS, labelled_only=True, shuffle_seed=seed)
    if cfg.train.shuffle == "full":
        train = train.random_shuffle(seed=RandomSeedConfig(seed=seed, reseed_after_execution=True))
    return {"train": train,
            "validate": read_split(data_dir, "validate", DIAGNOSIS_COLUMNS, labelled_only=True)}


def check_data(cfg: FinetuneConfig, summary: dict) -> tuple[int, int]:
    """Refuse data that cannot train this config; returns the labelled (train, validate) image counts."""
    labelled = summary.get("labelled_images_per_split", summary["splits"])
    n_train, n_val = labelled.get("train", 0), labelled.get("validate", 0)
    if n_train < cfg.scaling.num_workers * cfg.train.batch_size:
        raise SourceError(f"--data: {n_train} labelled training images are too few for "
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
    stored = summary["image_size"]
    if cfg.data.image_size > stored and not cfg.data.allow_resize:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is larger than the {stored}-px images the "
                          f"shards hold; ingest again with `medfuse ingest ... --image-size {cfg.data.image_size}`, "
                          "or set data.allow_resize=true to train on upsampled images")
    if cfg.data.image_size != stored:
        log.warning("finetune: shards hold %d-px images; data.image_size=%d resizes them on the fly",
                    stored, cfg.data.image_size)
    return n_train, n_val


def run(cfg: FinetuneConfig, data_dir: str | Path, workdir: str | Path) -> dict:
    """Train (or resume) and log/register the best model; returns the run facts."""
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import mlflow

    from pipelines.runtime import init_ray

    data_dir, workdir = Path(data_dir), Path(workdir).resolve()
    summary = load_summary(data_dir)
    n_train, n_val = check_data(cfg, summary)
    workdir.mkdir(parents=True, exist_ok=True)
    facts_path = workdir / STATE_FILE
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}

    checkpoints = find_checkpoints(workdir)
    latest = checkpoints[-1] if checkpoints else None
    if latest and facts.get("config"):
        changed = config_changes(facts["config"], cfg)
        if changed:
            raise ConfigError(f"--workdir: resuming a run trained with other settings ({', '.join(changed)}); "
                              "use a new workdir, or the original values")
        if facts.get("data_digest") and facts["data_digest"] != summary["digest"]:
            raise SourceError("--data: this is not the dataset the run in --workdir trained on (its digest "
                              "differs); pass the original --data, or use a new workdir")
    uri = tracking.tracking_uri(workdir)
    tracking.setup(workdir, cfg.tracking.experiment)
    run_id = facts.get("mlflow_run_id") if latest else None

    with mlflow.start_run(run_id=run_id, run_name=None if run_id else cfg.name) as active:
        run_id = active.info.run_id
        if not latest:
            tracking.log_params_flat(flatten(cfg))
            mlflow.set_tags({"medfuse.stage": "finetune", "medfuse.experiment": cfg.name})
            tracking.log_dataset(summary, data_dir, context="training")
            tracking.log_ingest(summary)
        mlflow.set_tag("medfuse.train_epochs", cfg.train.epochs)  # a param cannot change; epochs may grow on resume
        facts.update({"mlflow_run_id": run_id, "experiment": cfg.tracking.experiment, "tracking_uri": uri,
                      "data_dir": str(data_dir.resolve()), "data_digest": summary["digest"],
                      "config": cfg.model_dump()})
        facts_path.write_text(json.dumps(facts, indent=2))

        resume = None
        if latest and latest[0]["epoch"] + 1 >= cfg.train.epochs:
            log.info("finetune: the latest checkpoint already completed %d epochs; nothing to train", cfg.train.epochs)
            if facts.get("model_uri"):
                return facts  # already logged and registered: no duplicate model version
        else:
            init_ray()
            if latest:
                resume = str(latest[1])
                log.info("finetune: resuming from epoch %d (step %d)", latest[0]["epoch"], latest[0]["global_step"])
                mlflow.set_tag("medfuse.resumed_from_step", latest[0]["global_step"])
            train_options = DataConfig.default_ingest_options()
            train_options.preserve_order = True  # blocks in the seeded file order: reproducible epochs
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"config_json": cfg.model_dump_json(), "n_train": n_train, "n_validate": n_val,
                                   "tracking_uri": uri, "mlflow_run_id": run_id, "resume_from": resume},
                scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                             resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
                torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
                run_config=RunConfig(
                    name=f"finetune-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=str(workdir / "ray"),
                    checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute="val_auroc_macro",
                                                       checkpoint_score_order="max"),
                ),
                datasets=_datasets(data_dir, cfg),
                dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": train_options}),
            )
            trainer.fit()

        checkpoints = find_checkpoints(workdir)
        if not checkpoints:
            raise RuntimeError("training produced no checkpoint")
        best_state, best_dir = max(checkpoints, key=lambda item: (item[0].get("score", -1), item[0]["global_step"]))
        model_dir = workdir / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        shutil.copytree(best_dir / BUNDLE_DIR, model_dir)
        mlflow.log_metrics({"best/val_auroc_macro": best_state.get("score", float("nan")),
                            "best/epoch": best_state["epoch"]})
        info = tracking.log_model(model_dir, cfg.tracking.registered_model)
        facts.update({"best_epoch": best_state["epoch"], "best_val_auroc_macro": best_state.get("score"),
                      "model_dir": str(model_dir), "model_uri": info.model_uri,
                      "registered_model": cfg.tracking.registered_model})
        facts_path.write_text(json.dumps(facts, indent=2))
    return facts
