"""The driver every training stage shares: resume detection, the MLflow run, the TorchTrainer
(gloo on CPU, NCCL on GPU) over the one training loop, best-checkpoint selection, model logging.

Workdir layout (``<stage>`` is ``pretrain``, ``finetune`` or ``report``)::

    W/ray/<run>/checkpoint_*/      Ray Train checkpoints (DeepSpeed shards, bundle/, train_state.json);
                                   ``checkpoint.storage`` puts them elsewhere (shared path, s3://, gs://)
    W/model/                       the best checkpoint's self-contained model bundle
    W/<stage>.json                 run facts: stage, MLflow run id, Ray Train run name and storage,
                                   best score, dataset digest, lineage
    W/mlflow.db, W/mlartifacts/    the embedded MLflow store (unless MLFLOW_TRACKING_URI is set)

The Ray Train run name is fixed the first time a workdir trains and kept in ``W/<stage>.json``:
re-running with the same workdir gives Ray the same name and storage, and Ray Train restores the
run's latest checkpoint (after a killed driver, or to train more epochs). A failed worker is
restarted from the latest checkpoint up to ``scaling.max_failures`` times within one run.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from medfuse_core.config import ConfigError, flatten
from medfuse_core.data.sources import SourceError
from pipelines import tracking
from pipelines.checkpoints import (BUNDLE_DIR, CheckpointError, find_checkpoints, is_uri, ray_checkpoint,
                                   storage_arguments, train_state, write_probe)
from pipelines.train_loop import train_loop_per_worker

log = logging.getLogger("medfuse")


def state_file(stage: str) -> str:
    """The run-facts file of a stage's workdir."""
    return f"{stage}.json"


def _first_run_name(context, stage: str, workdir: Path, cfg) -> str:
    """The Ray Train run name for a workdir's first run (kept in its facts for every later run).

    A sweep trial's context gives a stable name; a workdir trained before names were kept
    continues its newest run; otherwise a new name, unique across workdirs sharing a storage.
    """
    if context is not None and context.train_run_name:
        return context.train_run_name
    if not cfg.checkpoint.storage:
        legacy = find_checkpoints(workdir / "ray")
        if legacy:
            return Path(legacy[-1][1]).parent.name
    return f"{stage}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def check_cluster_settings(cfg, storage: str, tracking_uri: str) -> None:
    """On a multi-node cluster, refuse settings only one node can see: an SQLite/file MLflow
    store, and checkpoint storage that is not shared (a URI, or a path every node mounts)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) <= 1:
        return
    if tracking.is_local_store(tracking_uri):
        raise ConfigError(f"MLFLOW_TRACKING_URI: this cluster has {len(nodes)} nodes and rank 0 may run on any "
                          f"of them, but the tracking store {tracking_uri.split(':', 1)[0]}:... is a file on this "
                          "one; start an `mlflow server` and export MLFLOW_TRACKING_URI=http://HOST:5000")
    if is_uri(storage):
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = write_probe(storage, f".medfuse-probe-{uuid.uuid4().hex}")

    @ray.remote(num_cpus=0)
    def sees(path: str) -> bool:
        import os

        return os.path.exists(path)

    try:
        seen = ray.get([sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(probe) for n in nodes])
    finally:
        Path(probe).unlink(missing_ok=True)
    blind = [n.get("NodeManagerAddress", n["NodeID"]) for n, ok in zip(nodes, seen) if not ok]
    if blind:
        where = "" if cfg.checkpoint.storage else " (the default, <workdir>/ray)"
        raise ConfigError(f"checkpoint.storage: {storage}{where} is not shared: {len(blind)} of {len(nodes)} nodes "
                          f"({', '.join(blind[:3])}) do not see it; put --workdir on a mount every node shares, or "
                          "set checkpoint.storage=s3://BUCKET/PATH or a shared path")


RESUMABLE_CHANGES = ("train.epochs", "train.log_every_steps", "scaling.max_failures", "scaling.torch_threads",
                     "checkpoint.keep")  # none changes what a checkpoint holds


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


def objective_datasets(data_dir: Path, cfg):
    """Train (a new file order every epoch) and validate datasets of every row, with the columns
    the experiment's objective reads (stage 1 and report generation: labelled or not)."""
    from medfuse_core.objectives import OBJECTIVES
    from pipelines.runtime import quiet_data_progress
    from pipelines.shards import read_split

    quiet_data_progress()
    columns = list(OBJECTIVES.get(cfg.objective.name).columns)
    return {"train": read_split(data_dir, "train", columns, shuffle_seed=cfg.train.seed),
            "validate": read_split(data_dir, "validate", columns)}


def prepare_init_from(cfg, workdir: str | Path, tmp: Path, checks: list[tuple[str, object]]):
    """Resolve ``cfg.init_from`` (a workdir, bundle folder, run id or models:/ URI), refuse a
    model whose ``model.<key>`` differs from this experiment's for each ``(key, value)`` in
    ``checks`` (a key the starting model lacks is not compared), and copy it to ``W/init_from/``
    (a resume needs the same weights). Returns ``(loop_extra, tags, lineage)``; empty without
    ``init_from``."""
    from medfuse_core.models.bundle import read_bundle_meta
    from pipelines.model_refs import resolve_model

    if not cfg.init_from:
        return {}, {}, {}
    try:
        bundle, facts = resolve_model(cfg.init_from, tmp, option="init_from")
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    except Exception as exc:  # an unknown run id or URI
        raise ConfigError(f"init_from: cannot find a model at {cfg.init_from!r} ({type(exc).__name__}); pass a "
                          "training workdir, a bundle folder, a run id or a models:/ URI") from None
    meta = read_bundle_meta(bundle)
    theirs = meta.get("model_config", {})
    for key, mine in checks:
        section, name = key.split(".")
        if section not in theirs:
            continue
        other = theirs[section].get(name)
        if other != mine:
            raise ConfigError(f"init_from: the starting model has model.{key}={other!r}, this experiment "
                              f"model.{key}={mine!r}; set model.{key}={other!r}")
    if int(meta.get("image_size", 0)) != cfg.data.image_size:
        log.warning("%s: the starting model saw %s-px images, this run trains at %d px",
                    cfg.name, meta.get("image_size"), cfg.data.image_size)
    lineage = {"init_from": cfg.init_from, "init_from_kind": meta.get("kind", "diagnosis"),
               "init_from_run_id": facts.get("mlflow_run_id"), "init_from_tracking_uri": facts.get("tracking_uri"),
               "init_from_data_digest": facts.get("data_digest"), "init_from_model_uri": facts.get("model_uri")}
    lineage = {k: v for k, v in lineage.items() if v is not None}
    saved = Path(workdir).resolve() / "init_from"
    if not saved.exists():
        saved.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(bundle, saved)
    return {"init_from_bundle": str(saved)}, {f"medfuse.{k}": str(v) for k, v in lineage.items()}, lineage


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
                 context: RunContext | None = None, finalize_model=None) -> dict:
    """Train (or resume) one stage with the shared loop; log and register the best model.

    ``datasets_fn()`` returns the Ray datasets (``train``, ``validate``); ``loop_extra`` reaches
    the workers; ``params_extra``/``tags`` are logged on a new MLflow run; ``facts_extra`` is
    stored in ``W/<stage>.json``; ``context`` places the run inside a sweep; ``finalize_model(model_dir)``
    may complete the best model's bundle before it is logged (calibration) and returns
    ``(metrics, figures)`` for the run. Returns the run facts.
    """
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    import mlflow

    from medfuse_core.objectives import OBJECTIVES
    from pipelines.runtime import init_ray

    objective = OBJECTIVES.get(cfg.objective.name)
    data_dir, workdir = Path(data_dir), Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    facts_path = workdir / state_file(stage)
    other = [s for s in ("pretrain", "finetune", "report") if s != stage and (workdir / state_file(s)).exists()]
    if other:
        raise SourceError(f"--workdir: {workdir} holds a {other[0]} run; give each stage its own workdir")
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}

    storage = cfg.checkpoint.storage or str(workdir / "ray")
    run_name = facts.get("train_run_name") or _first_run_name(context, stage, workdir, cfg)
    checkpoints = find_checkpoints(storage, run_name)
    latest = checkpoints[-1] if checkpoints else None
    if latest is None and facts.get("last_checkpoint_epoch") is not None:
        raise CheckpointError(f"--workdir: no complete checkpoint of this run is left in {storage}/{run_name} "
                              f"(it had reached epoch {facts['last_checkpoint_epoch'] + 1}): they are missing or "
                              "incomplete; restore them, or train again in a new --workdir")
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
                      "train_run_name": run_name, "checkpoint_storage": storage,
                      "tracking_uri": uri, "data_dir": str(data_dir.resolve()), "data_digest": summary["digest"],
                      "config": cfg.model_dump(), **(facts_extra or {})})
        facts_path.write_text(json.dumps(facts, indent=2))

        if latest and latest[0]["epoch"] + 1 >= cfg.train.epochs:
            log.info("%s: the latest checkpoint already completed %d epochs; nothing to train", stage, cfg.train.epochs)
            if facts.get("model_uri"):
                return facts  # already logged and registered: no duplicate model version
            reported = [(ray_checkpoint(path, storage), state) for state, path in checkpoints]
        else:
            init_ray()
            check_cluster_settings(cfg, storage, uri)
            if latest:
                log.info("%s: resuming from epoch %d (step %d)", stage, latest[0]["epoch"], latest[0]["global_step"])
                mlflow.set_tag("medfuse.resumed_from_step", latest[0]["global_step"])
            train_options = DataConfig.default_ingest_options()
            train_options.preserve_order = True  # blocks in the seeded file order: reproducible epochs
            storage_fs, storage_path = storage_arguments(storage)
            trainer = TorchTrainer(
                train_loop_per_worker,
                train_loop_config={"stage": stage, "config_json": cfg.model_dump_json(), "n_train": n_train,
                                   "n_validate": n_val, "tracking_uri": uri, "mlflow_run_id": run_id,
                                   **(loop_extra or {})},
                scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                             resources_per_worker={"CPU": cfg.scaling.cpus_per_worker}),
                torch_config=TorchConfig(backend="nccl" if cfg.scaling.use_gpu else "gloo"),
                run_config=RunConfig(
                    name=run_name,  # the same name and storage: Ray Train restores the latest checkpoint
                    storage_path=storage_path,
                    storage_filesystem=storage_fs,
                    callbacks=list(ctx.callbacks),
                    failure_config=FailureConfig(max_failures=cfg.scaling.max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep,
                                                       checkpoint_score_attribute=score_attr,
                                                       checkpoint_score_order="max"),
                ),
                datasets=datasets_fn(),
                dataset_config=DataConfig(datasets_to_split=["train"], execution_options={"train": train_options}),
            )
            result = trainer.fit()
            reported = [(c, train_state(c)) for c, _ in result.best_checkpoints]
        if not reported:
            raise RuntimeError("training produced no checkpoint")
        best, best_state = max(reported, key=lambda item: (item[1].get("score", -1), item[1]["global_step"]))
        last_state = max((state for _, state in reported), key=lambda state: state["global_step"])
        facts["last_checkpoint_epoch"] = last_state["epoch"]
        model_dir = workdir / "model"
        if model_dir.exists():
            shutil.rmtree(model_dir)
        with best.as_directory() as folder:  # a local folder, or a download from an object store
            shutil.copytree(Path(folder) / BUNDLE_DIR, model_dir)
        if finalize_model is not None:
            metrics, figures = finalize_model(model_dir)
            if metrics:
                mlflow.log_metrics(metrics)
            for name, fig in figures.items():
                mlflow.log_figure(fig, name)
        best_name = f"best/{objective.score_key.split('/', 1)[-1]}"
        mlflow.log_metrics({best_name: best_state.get("score", float("nan")), "best/epoch": best_state["epoch"]})
        registered = cfg.tracking.registered_model if ctx.register else None
        from pipelines.model_card import write_model_card

        card = write_model_card(model_dir, facts, summary)
        mlflow.log_artifact(str(card))  # on the run page, and inside the logged model's bundle
        info = tracking.log_model(model_dir, registered)
        facts.update({"best_epoch": best_state["epoch"], "best_score": best_state.get("score"),
                      "score_key": objective.score_key, "model_dir": str(model_dir), "model_uri": info.model_uri,
                      "registered_model": registered})
        if stage == "finetune":
            facts["best_val_auroc_macro"] = best_state.get("score")
        facts_path.write_text(json.dumps(facts, indent=2))
    return facts
