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
from pipelines.ingest import SHARDS_DIR, load_summary
from pipelines.train_loop import BUNDLE_DIR, DS_TAG, TRAIN_STATE, train_loop_per_worker

log = logging.getLogger("medfuse")

STATE_FILE = "finetune.json"


def _complete(state: dict, folder: Path) -> bool:
    """Rank 0's bundle and state, and every rank's DeepSpeed optimizer shard, arrived."""
    if not (folder / BUNDLE_DIR / "medfuse_model.json").is_file():
        return False
    shards = list((folder / DS_TAG).glob("*optim_states.pt"))
    return len(shards) >= int(state.get("world_size", 1))


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


def _datasets(data_dir: Path, seed: int):
    """Train (streamed, re-read each epoch) and validate (small: materialised once) datasets."""
    import ray

    from pipelines.runtime import quiet_data_progress

    quiet_data_progress()
    shards = str(data_dir / SHARDS_DIR)
    base = ray.data.read_parquet(shards)
    return {
        "train": base.filter(expr="split == 'train'").random_shuffle(seed=seed),  # reproducible; the
        # workers' local shuffle buffers (seeded per epoch and rank) vary the order between epochs
        "validate": base.filter(expr="split == 'validate'").materialize(),
    }


def run(cfg: FinetuneConfig, data_dir: str | Path, workdir: str | Path) -> dict:
    """Train (or resume) and log/register the best model; returns the run facts."""
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import mlflow

    from pipelines.runtime import init_ray

    data_dir, workdir = Path(data_dir), Path(workdir).resolve()
    summary = load_summary(data_dir)
    n_train, n_val = summary["splits"].get("train", 0), summary["splits"].get("validate", 0)
    if n_train < cfg.scaling.num_workers * cfg.train.batch_size:
        raise SourceError(f"--data: {n_train} training images are too few for "
                          f"scaling.num_workers x train.batch_size = {cfg.scaling.num_workers * cfg.train.batch_size}")
    if n_val == 0:
        raise SourceError("--data: the validate split is empty")
    if summary["image_size"] != cfg.data.image_size:
        log.warning("shards hold %dpx images; data.image_size=%d resizes them on the fly",
                    summary["image_size"], cfg.data.image_size)
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
        facts.update({"mlflow_run_id": run_id, "experiment": cfg.tracking.experiment, "tracking_uri": uri,
                      "data_dir": str(data_dir.resolve()), "config": cfg.model_dump()})
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
                datasets=_datasets(data_dir, cfg.train.seed),
                dataset_config=DataConfig(datasets_to_split=["train"]),
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
