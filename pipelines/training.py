"""The driver every training stage shares: resume detection, the MLflow run, the TorchTrainer
(gloo on CPU, NCCL on GPU) over the one training loop, best-checkpoint selection, model logging.

Workdir layout (``<stage>`` is ``pretrain`` or ``finetune``)::

    W/ray/<run>/checkpoint_*/      Ray Train checkpoints (DeepSpeed shards, bundle/, train_state.json)
    W/model/                       the best checkpoint's self-contained model bundle
    W/<stage>.json                 run facts: stage, MLflow run id, best score, dataset digest, lineage
    W/mlflow.db, W/mlartifacts/    the embedded MLflow store (unless MLFLOW_TRACKING_URI is set)

Re-running with the same workdir resumes from the latest complete checkpoint found there.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from medfuse_core.config import ConfigError, flatten
from medfuse_core.data.sources import SourceError
from pipelines import tracking
from pipelines.train_loop import BUNDLE_DIR, RANKS_DIR, TRAIN_STATE, train_loop_per_worker

log = logging.getLogger("medfuse")


def state_file(stage: str) -> str:
    """The run-facts file of a stage's workdir."""
    return f"{stage}.json"


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
    for path in (Path(workdir) / "ray").glob(f"*/checkpoint_*/{TRAIN_STATE}"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if _complete(state, path.parent):
            found.append((state, path.parent))
    return sorted(found, key=lambda item: item[0]["global_step"])


RESUMABLE_CHANGES = ("train.epochs", "train.log_every_steps")


def config_changes(previous: dict, cfg) -> list[str]:
    """Dotted keys whose values differ from the run being resumed (epochs may grow). A key the
    earlier run's schema did not have yet counts only if it is set away from its default."""
    old, new = flatten(previous), flatten(cfg)
    defaults = flatten(type(cfg)())
    return sorted(k for k in set(old) | set(new) if k not in RESUMABLE_CHANGES and old.get(k) != new.get(k)
                  and not (k not in old and new.get(k) == defaults.get(k)))


def check_image_size(cfg, summary: dict) -> None:
    """Refuse training above the shards' stored size unless ``data.allow_resize``."""
    stored = summary["image_size"]
    if cfg.data.image_size > stored and not cfg.data.allow_resize:
        raise ConfigError(f"data.image_size: {cfg.data.image_size} is larger than the {stored}-px images the "
                          f"shards hold; ingest again with `medfuse ingest ... --image-size {cfg.data.image_size}`, "
                          "or set data.allow_resize=true to train on upsampled images")
    if cfg.data.image_size != stored:
        log.warning("%s: shards hold %d-px images; data.image_size=%d resizes them on the fly",
                    cfg.name, stored, cfg.data.image_size)


@dataclass
class RunContext:
    """Where a run is tracked when it is part of something larger (a sweep trial).

    ``store_dir``: the workdir whose MLflow store to use (default: the run's own workdir);
    ``run_id``: continue this MLflow run; ``run_name``/``tags`` name and tag a new run (e.g.
    ``mlflow.parentRunId``); ``register``: register the best model; ``train_run_name``: a stable
    Ray Train run name; ``callbacks``: Ray Train callbacks (e.g. Tune's ``TuneReportCallback``).
    """

    store_dir: Path | None = None
    run_id: str | None = None
    run_name: str | None = None
    tags: dict = field(default_factory=dict)
    register: bool = True
    train_run_name: str | None = None
    callbacks: list = field(default_factory=list)


def run_training(stage: str, cfg, data_dir: str | Path, workdir: str | Path, *, summary: dict, datasets_fn,
                 n_train: int, n_val: int, loop_extra: dict | None = None, params_extra: dict | None = None,
                 tags: dict | None = None, facts_extra: dict | None = None,
                 context: RunContext | None = None) -> dict:
    """Train (or resume) one stage with the shared loop; log and register the best model.

    ``datasets_fn()`` returns the Ray datasets (``train``, ``validate``); ``loop_extra`` reaches
    the workers; ``params_extra``/``tags`` are logged on a new MLflow run; ``facts_extra`` is
    stored in ``W/<stage>.json``; ``context`` places the run inside a sweep. Returns the run facts.
    """
    from ray.train import CheckpointConfig, DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import mlflow

    from medfuse_core.objectives import OBJECTIVES
    from pipelines.runtime import init_ray

    objective = OBJECTIVES.get(cfg.objective.name)
    data_dir, workdir = Path(data_dir), Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    facts_path = workdir / state_file(stage)
    other = [s for s in ("pretrain", "finetune") if s != stage and (workdir / state_file(s)).exists()]
    if other:
        raise SourceError(f"--workdir: {workdir} holds a {other[0]} run; give each stage its own workdir")
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
    ctx = context or RunContext()
    store = Path(ctx.store_dir).resolve() if ctx.store_dir else workdir
    uri = tracking.tracking_uri(store)
    tracking.setup(store, cfg.tracking.experiment)
    run_id = ctx.run_id or (facts.get("mlflow_run_id") if latest else None)
    score_attr = objective.score_key.replace("/", "_")

    new_run = run_id is None
    with mlflow.start_run(run_id=run_id, run_name=None if run_id else (ctx.run_name or cfg.name),
                          tags=ctx.tags if new_run else None) as active:
        run_id = active.info.run_id
        if new_run:
            tracking.log_params_flat({**flatten(cfg), **(params_extra or {})})
            mlflow.set_tags({"medfuse.stage": stage, "medfuse.experiment": cfg.name,
                             "medfuse.objective": cfg.objective.name, **(tags or {})})
            tracking.log_dataset(summary, data_dir, context="training")
            tracking.log_ingest(summary)
        mlflow.set_tag("medfuse.train_epochs", cfg.train.epochs)  # a param cannot change; epochs may grow on resume
        facts.update({"stage": stage, "mlflow_run_id": run_id, "experiment": cfg.tracking.experiment,
                      "tracking_uri": uri, "data_dir": str(data_dir.resolve()), "data_digest": summary["digest"],
                      "config": cfg.model_dump(), **(facts_extra or {})})
        facts_path.write_text(json.dumps(facts, indent=2))

        resume = None
        if latest and latest[0]["epoch"] + 1 >= cfg.train.epochs:
            log.info("%s: the latest checkpoint already completed %d epochs; nothing to train", stage, cfg.train.epochs)
            if facts.get("model_uri"):
                return facts  # already logged and registered: no duplicate model version
        else:
            init_ray()
            if latest:
                resume = str(latest[1])
                log.info("%s: resuming from epoch %d (step %d)", stage, latest[0]["epoch"], latest[0]["global_step"])
                mlflow.set_tag("medfuse.resumed_from_step", latest[0]["global_step"])
            train_options = DataConfig.default_ingest_options()
            train_options.preserve_order = True  # blocks in the seeded file order: reproducible epochs
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"stage": stage, "config_json": cfg.model_dump_json(), "n_train": n_train,
                                   "n_validate": n_val, "tracking_uri": uri, "mlflow_run_id": run_id,
                                   "resume_from": resume, **(loop_extra or {})},
                scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                             resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
                torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
                run_config=RunConfig(
                    name=ctx.train_run_name or f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}",
                    storage_path=str(workdir / "ray"),
                    callbacks=list(ctx.callbacks),
                    checkpoint_config=CheckpointConfig(num_to_keep=2, checkpoint_score_attribute=score_attr,
                                                       checkpoint_score_order="max"),
                ),
                datasets=datasets_fn(),
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
        best_name = f"best/{objective.score_key.split('/', 1)[-1]}"
        mlflow.log_metrics({best_name: best_state.get("score", float("nan")), "best/epoch": best_state["epoch"]})
        registered = cfg.tracking.registered_model if ctx.register else None
        info = tracking.log_model(model_dir, registered)
        facts.update({"best_epoch": best_state["epoch"], "best_score": best_state.get("score"),
                      "score_key": objective.score_key, "model_dir": str(model_dir), "model_uri": info.model_uri,
                      "registered_model": registered})
        if stage == "finetune":
            facts["best_val_auroc_macro"] = best_state.get("score")
        facts_path.write_text(json.dumps(facts, indent=2))
    return facts
