"""``medfuse sweep``: Ray Tune over any experiment key, each trial a full Ray Train + DeepSpeed run.

Every trial is a Tune function trainable that builds the stage's config from the base
experiment plus its drawn values and calls the stage's ``run`` (the shared driver in
:mod:`pipelines.training`) with a :class:`~pipelines.training.RunContext`: its own workdir
``W/trials/<trial_id>``, a stable Ray Train run name, Tune's ``TuneReportCallback`` (per-epoch
validation metrics reach the scheduler) and a child MLflow run under the sweep's parent run.
The trial itself reserves no CPU (its driver is idle while its Train workers run; it reserves
a little memory), so
concurrency follows what each trial's workers ask for (``sweep.max_concurrent_trials``, by
default as many as the cluster holds with a CPU per trial left for Ray Data's reads).

Workdir layout::

    W/sweep.json          the sweep's facts: parent MLflow run, results table, best trial
    W/tune/               Tune's experiment state (``Tuner.restore`` picks it up)
    W/trials/<trial_id>/  each trial's stage workdir (checkpoints, model bundle, <stage>.json)
    W/mlflow.db, W/mlartifacts/   the MLflow store (unless MLFLOW_TRACKING_URI is set)

Re-running the same command on the same workdir resumes: finished trials are kept, unfinished
ones continue from their latest checkpoint in their own child run; errored trials stay errored
(`--retry-errored` runs them again from their own latest checkpoints).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from medfuse_core.config import ConfigError, flatten
from medfuse_core.registry import Registry
from medfuse_core.sweep_config import Sweep, trial_raw, validate_stage

log = logging.getLogger("medfuse")

STATE_FILE = "sweep.json"
TUNE_DIR = "tune"
TRIALS_DIR = "trials"
# CPUs left free per concurrent trial for its Ray Data read and decode tasks (trials that take
# every CPU for their workers starve their own input pipelines)
DATA_CPUS_PER_TRIAL = 1
# what a trial itself reserves: memory for its driver process, no CPU (it waits on its workers;
# Tune refuses an empty request, and a CPU share would leave Ray Data's 1-CPU read tasks no room)
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024 ** 2}

# per stage: the metrics every epoch reports (exact names, and per-label prefixes)
EPOCH_METRICS = {
    "finetune": ({"val/auroc_macro", "val/auroc_macro_image_only", "val/auprc_macro", "train/loss_epoch"},
                 ("val/auroc/",)),
    "pretrain": ({"val/retrieval_mean_recall", "val/zero_shot_auroc_macro", "val/logit_scale", "train/loss_epoch"},
                 ("val/retrieval/", "val/zero_shot_auroc/")),
}

SCHEDULERS: Registry = Registry("trial scheduler")
SEARCHERS: Registry = Registry("search algorithm")


@SCHEDULERS.register("asha")
def _asha(sweep: Sweep, metric: str):
    """Asynchronous successive halving on ``epochs_done``: trials below the rung's top
    ``1/reduction_factor`` stop and free their workers; survivors train all epochs."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class FinishingASHA(ASHAScheduler):
        """ASHA whose last rung (at ``max_t``) never stops a trial: one that trained every epoch
        goes on to log its model (Ray's rungs include ``max_t`` itself)."""

        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            return TrialScheduler.CONTINUE if result.get(self._time_attr, 0) >= self._max_t else action

    sc = sweep.config.sweep.scheduler
    epochs = sweep.base.train.epochs
    return FinishingASHA(time_attr="epochs_done", max_t=epochs,  # metric, mode: from the TuneConfig
                         grace_period=min(sc.grace_period, epochs), reduction_factor=sc.reduction_factor,
                         stop_last_trials=False)


@SCHEDULERS.register("fifo")
def _fifo(sweep: Sweep, metric: str):
    """Every trial trains to the end (comparisons that need full runs)."""
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


@SEARCHERS.register("random")
def _random(sweep: Sweep, metric: str, max_concurrent: int):
    """Random draws (and grid entries) from the space, seeded."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    # Tune applies max_concurrent_trials only to Searchers: this generator takes it itself
    return BasicVariantGenerator(random_state=sweep.config.sweep.searcher.seed, max_concurrent=max_concurrent)


@SEARCHERS.register("optuna")
def _optuna(sweep: Sweep, metric: str, max_concurrent: int):
    """Optuna's TPE sampler (``pip install -e ".[sweep]"``)."""
    try:
        from ray.tune.search.optuna import OptunaSearch

        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("sweep.searcher.name: optuna is not installed; run `pip install -e \".[sweep]\"` "
                          "or choose searcher random") from None
    from ray.tune.search import ConcurrencyLimiter

    # metric, mode: from the TuneConfig
    return ConcurrencyLimiter(OptunaSearch(seed=sweep.config.sweep.searcher.seed), max_concurrent=max_concurrent)


def tune_metric(sweep: Sweep) -> str:
    """The metric's name as Ray Train reports it (``val/auroc_macro`` -> ``val_auroc_macro``)."""
    return sweep.config.sweep.metric.replace("/", "_")


def check_sweep(sweep: Sweep) -> None:
    """Refuse names and combinations the sweep cannot run; each error names the key."""
    sw = sweep.config.sweep
    for key, name, registry in (("sweep.scheduler.name", sw.scheduler.name, SCHEDULERS),
                                ("sweep.searcher.name", sw.searcher.name, SEARCHERS)):
        if name not in registry:
            raise ConfigError(f"{key}: unknown {registry.kind} {name!r}; choose one of {registry.names()}")
    grids = [k for k, e in sw.space.items() if e.kind == "grid"]
    if grids and sw.searcher.name != "random":
        raise ConfigError(f"sweep.space.{grids[0]}: grid entries need searcher random "
                          f"(sweep.searcher.name={sw.searcher.name} draws its own points); use choice")
    known, prefixes = EPOCH_METRICS[sweep.stage]
    if sw.metric not in known and not sw.metric.startswith(prefixes):
        raise ConfigError(f"sweep.metric: {sw.metric!r} is not reported per epoch by a {sweep.stage} run; "
                          f"choose one of {sorted(known)} or a per-label {'/'.join(prefixes)}... key")
    if sw.metric == "val/zero_shot_auroc_macro" or sw.metric.startswith("val/zero_shot_auroc/"):
        from medfuse_core.objectives import build_objective

        if build_objective(sweep.base).prompts_path() is None:
            raise ConfigError("sweep.metric: zero-shot metrics need a prompt file (data.prompts)")
    if "loss" in sw.metric and sw.mode != "min":
        raise ConfigError(f"sweep.mode: {sw.metric} is a loss; set sweep.mode=min")
    if sw.searcher.name == "optuna":
        for key, entry in sw.space.items():
            if entry.kind == "choice" and any(isinstance(v, (list, dict)) for v in entry.args):
                raise ConfigError(f"sweep.space.{key}: optuna draws scalar choices only; use searcher random")


def param_space(sweep: Sweep) -> dict:
    """The Tune search space: one domain per swept dotted key."""
    from ray import tune

    make = {"choice": tune.choice, "grid": tune.grid_search, "uniform": lambda a: tune.uniform(*a),
            "loguniform": lambda a: tune.loguniform(*a), "randint": lambda a: tune.randint(*a)}
    return {key: make[e.kind](e.args) for key, e in sweep.config.sweep.space.items()}


def concurrency(sweep: Sweep, cluster: dict) -> int:
    """Trials at once: what the cluster holds of each trial's workers plus its data CPUs."""
    asked = sweep.config.sweep.max_concurrent_trials
    if asked:
        return asked
    s = sweep.base.scaling
    per_trial_cpu = s.num_workers * s.cpus_per_worker + DATA_CPUS_PER_TRIAL
    n = int(cluster.get("CPU", 0) // per_trial_cpu)
    if s.use_gpu:
        n = min(n, int(cluster.get("GPU", 0) // s.num_workers))
    return max(1, n)


def _trial_name(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_trial(params: dict, ctx: dict) -> None:
    """One Tune trial: the stage's training run with the drawn values, reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines import sweep_tracking
    from pipelines.runtime import quiet_third_party
    from pipelines.training import RunContext

    quiet_third_party()
    if ctx.get("mlflow_tracking_uri"):  # a tracking server: every trial logs where the parent is
        os.environ["MLFLOW_TRACKING_URI"] = ctx["mlflow_tracking_uri"]
    trial_id = tune.get_context().get_trial_id()
    cfg = validate_stage(trial_raw(ctx["base_raw"], params), ctx["stage"], f"trial {trial_id}")
    store = Path(ctx["workdir"])
    child = sweep_tracking.find_child(store, cfg.tracking.experiment, ctx["parent_run_id"], trial_id)
    context = RunContext(
        store_dir=store, run_id=child, run_name=f"{ctx['name']}-{trial_id}",
        tags=sweep_tracking.child_tags(ctx["parent_run_id"], ctx["name"], trial_id, params),
        register=False, train_run_name=f"trial-{trial_id}", callbacks=[TuneReportCallback()])
    stage = _stage_module(ctx["stage"])
    stage.run(cfg, ctx["data_dir"], store / TRIALS_DIR / trial_id, context=context)


def _stage_module(stage: str):
    from pipelines import finetune, pretrain, train_report

    return {"finetune": finetune, "pretrain": pretrain, "report": train_report}[stage]


def _check_data(sweep: Sweep, data_dir: Path) -> str:
    from pipelines.ingest import load_summary

    summary = load_summary(data_dir)
    if sweep.stage == "finetune":
        _stage_module("finetune").check_data(sweep.base, summary, data_dir)
    else:
        _stage_module(sweep.stage).check_data(sweep.base, summary)
    return summary["digest"]


def _facts_config(sweep: Sweep) -> dict:
    return {"sweep": sweep.config.model_dump(), "base": sweep.base.model_dump()}


def _changed(previous: dict, current: dict, stage: str) -> list[str]:
    """Keys of the sweep's facts config that differ; a base-experiment key the earlier run's schema
    did not have yet counts only if it is set away from its default."""
    from medfuse_core.config import STAGE_SCHEMAS

    old, new = flatten(previous), flatten(current)
    defaults = flatten({"base": STAGE_SCHEMAS[stage]().model_dump()})
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k)
                  and not (k not in old and k in defaults and new.get(k) == defaults[k]))


def run(sweep: Sweep, data_dir: str | Path, workdir: str | Path, retry_errored: bool = False) -> dict:
    """Run (or resume) a sweep; log the parent run, its table and plots; register the best
    trial's model under ``sweep.alias``. Returns the sweep facts (``W/sweep.json``).

    A resumed sweep keeps errored trials errored unless ``retry_errored``: then each continues
    from its own latest checkpoint."""
    import ray
    from ray import tune

    from pipelines import sweep_tracking
    from pipelines.runtime import init_ray

    from medfuse_core.data.sources import SourceError

    check_sweep(sweep)
    data_dir, workdir = Path(data_dir).resolve(), Path(workdir).resolve()
    digest = _check_data(sweep, data_dir)
    facts_path = workdir / STATE_FILE
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    if facts.get("data_digest") and facts["data_digest"] != digest:
        raise SourceError("--data: this is not the dataset the sweep in --workdir ran on (its digest differs); "
                          "pass the original --data, or use a new workdir")
    if facts.get("config"):
        changed = _changed(facts["config"], _facts_config(sweep), sweep.stage)
        if changed:
            raise ConfigError(f"--workdir: resuming a sweep run with other settings ({', '.join(changed[:6])}); "
                              "use a new workdir, or the original values")
    for other in ("finetune.json", "pretrain.json"):
        if (workdir / other).exists():
            raise ConfigError(f"--workdir: {workdir} holds a {other.split('.')[0]} run; give the sweep its own workdir")

    workdir.mkdir(parents=True, exist_ok=True)
    init_ray()
    metric = tune_metric(sweep)
    parent = sweep_tracking.open_parent(workdir, sweep, facts.get("parent_run_id"))
    facts.update({"name": sweep.config.name, "stage": sweep.stage, "parent_run_id": parent, "data_digest": digest,
                  "experiment": sweep.base.tracking.experiment, "data_dir": str(data_dir),
                  "config": _facts_config(sweep), "tune_path": str(workdir / TUNE_DIR)})
    facts_path.write_text(json.dumps(facts, indent=2))

    ctx = {"base_raw": sweep.base_raw, "stage": sweep.stage, "workdir": str(workdir), "data_dir": str(data_dir),
           "parent_run_id": parent, "name": sweep.config.name,
           "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI")}
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), TRIAL_DRIVER_RESOURCES)
    path = str(workdir / TUNE_DIR)
    if tune.Tuner.can_restore(path):
        log.info("sweep: resuming the sweep in %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=retry_errored)
    else:
        n_at_once = concurrency(sweep, ray.cluster_resources())
        log.info("sweep: %d trials, %d at a time, %s scheduler, %s search on %s", sweep.config.sweep.num_samples,
                 n_at_once, sweep.config.sweep.scheduler.name, sweep.config.sweep.searcher.name, sweep.config.sweep.metric)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep),
            tune_config=tune.TuneConfig(
                metric=metric, mode=sweep.config.sweep.mode, num_samples=sweep.config.sweep.num_samples,
                scheduler=SCHEDULERS.get(sweep.config.sweep.scheduler.name)(sweep, metric),
                search_alg=SEARCHERS.get(sweep.config.sweep.searcher.name)(sweep, metric, n_at_once),
                trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
            run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(workdir), verbose=1),
        )
    try:
        grid = tuner.fit()
    except BaseException:
        sweep_tracking.end_parent(parent, "KILLED")
        raise
    rows = collect_rows(grid, sweep, workdir)
    summary = sweep_tracking.finish(workdir, sweep, parent, rows)
    facts.update(summary)
    facts_path.write_text(json.dumps(facts, indent=2, default=str))
    return facts


def _history(result, metric: str) -> list[tuple[int, float]]:
    """(epochs_done, metric) per epoch of a trial, the last report of an epoch winning (a resumed
    trial may report an epoch twice)."""
    df = result.metrics_dataframe
    if df is None or metric not in df or "epochs_done" not in df:
        return []
    curve = {}
    for epochs_done, value in zip(df["epochs_done"], df[metric]):
        if epochs_done == epochs_done and value == value:
            curve[int(epochs_done)] = float(value)
    return sorted(curve.items())


def collect_rows(grid, sweep: Sweep, workdir: Path) -> list[dict]:
    """One row per trial: id, status, drawn values, epochs done, last and best metric, its model."""
    metric = tune_metric(sweep)
    better = max if sweep.config.sweep.mode == "max" else min
    rows = []
    for result in grid:
        trial_id = Path(result.path).name.removeprefix("trial_")
        facts_file = workdir / TRIALS_DIR / trial_id / f"{sweep.stage}.json"
        trial_facts = json.loads(facts_file.read_text()) if facts_file.exists() else {}
        curve = _history(result, metric)
        done = curve[-1][0] if curve else 0
        if result.error is not None:
            status = "errored"
        elif trial_facts.get("model_uri"):
            status = "completed"
        else:  # ended before it logged a model: the scheduler stopped it
            status = "stopped"
        values = [v for _, v in curve]
        rows.append({
            "trial_id": trial_id, "status": status,
            "params": {k: result.config.get(k) for k in sweep.config.sweep.space},
            "epochs_done": done, "curve": curve,
            "metric_last": values[-1] if values else math.nan,
            "metric_best": better(values) if values else math.nan,
            "mlflow_run_id": trial_facts.get("mlflow_run_id"), "model_uri": trial_facts.get("model_uri"),
            "error": type(result.error).__name__ if result.error is not None else None,
        })
    return sorted(rows, key=lambda r: r["trial_id"])
