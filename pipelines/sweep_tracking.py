"""MLflow for sweeps (Ray has no Train V2 MLflow callback): the parent run, child runs per trial
found again by their ``medfuse.trial_id`` tag, the results table and plots, the ``sweep-best``
alias. Nothing here logs a record of the data; params are config values only.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from medfuse_core.config import flatten
from pipelines import tracking

log = logging.getLogger("medfuse")

TRIAL_TAG = "medfuse.trial_id"
STATUS_TAG = "medfuse.trial_status"
SWEEP_TAG = "medfuse.sweep"
RUN_STATUS = {"completed": "FINISHED", "stopped": "KILLED", "errored": "FAILED"}


def child_tags(parent_run_id: str, sweep_name: str, trial_id: str, params: dict) -> dict:
    """Tags of a new child run: its parent, the sweep, the trial id, the drawn values."""
    tags = {"mlflow.parentRunId": parent_run_id, SWEEP_TAG: sweep_name, TRIAL_TAG: trial_id, STATUS_TAG: "running"}
    tags.update({f"medfuse.sweep.{k}": str(v)[:500] for k, v in params.items()})
    return tags


def find_child(store: Path, experiment: str, parent_run_id: str, trial_id: str) -> str | None:
    """The child run a trial started before (a resumed trial continues it), or None."""
    import mlflow

    exp_id = tracking.setup(store, experiment)
    runs = mlflow.MlflowClient().search_runs(
        [exp_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
        max_results=2)
    if len(runs) > 1:
        log.warning("sweep: trial %s has %d child runs; continuing the newest", trial_id, len(runs))
    return runs[0].info.run_id if runs else None


def open_parent(workdir: Path, sweep, run_id: str | None) -> str:
    """Create the sweep's parent run (params, search space) or reopen it; returns its id."""
    import mlflow

    tracking.setup(workdir, sweep.base.tracking.experiment)
    if run_id:
        mlflow.MlflowClient().update_run(run_id, status="RUNNING")
        return run_id
    cfg = sweep.config
    with mlflow.start_run(run_name=cfg.name, tags={"medfuse.stage": "sweep", SWEEP_TAG: cfg.name,
                                                    "medfuse.sweep_stage": cfg.stage}) as run:
        section = cfg.sweep.model_dump(exclude={"space"})
        tracking.log_params_flat({f"sweep.{k}": v for k, v in flatten(section).items()})
        tracking.log_params_flat({"sweep.base": cfg.base or "defaults",
                                  "sweep.space": {k: {e.kind: e.args} for k, e in cfg.sweep.space.items()}})
        mlflow.log_dict({k: {e.kind: e.args} for k, e in cfg.sweep.space.items()}, "sweep/space.json")
        mlflow.log_dict(flatten(sweep.base), "sweep/base_experiment.json")
        run_id = run.info.run_id
    mlflow.MlflowClient().update_run(run_id, status="RUNNING")  # until the sweep ends
    return run_id


def end_parent(run_id: str, status: str) -> None:
    """Mark the parent run ended (``KILLED`` when the sweep stopped with an error or interrupt)."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status)


def _mark_children(rows: list[dict]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for row in rows:
        if not row.get("mlflow_run_id"):
            continue
        client.set_tag(row["mlflow_run_id"], STATUS_TAG, row["status"])
        # a trial the scheduler stopped was interrupted mid-run (its run reads RUNNING or FAILED)
        if client.get_run(row["mlflow_run_id"]).info.status != RUN_STATUS[row["status"]]:
            client.set_terminated(row["mlflow_run_id"], RUN_STATUS[row["status"]])


def register_best(sweep, best: dict) -> dict:
    """Register the best trial's model and point the alias at it; a rerun reuses the version
    that run already registered (no duplicate)."""
    import mlflow

    name = sweep.base.tracking.registered_model
    if not name or not best.get("model_uri"):
        return {}
    client = mlflow.MlflowClient()
    mine = [v for v in client.search_model_versions(f"name='{name}'") if v.run_id == best["mlflow_run_id"]]
    if mine:
        version = max(int(v.version) for v in mine)
    else:
        version = int(mlflow.register_model(best["model_uri"], name).version)
    alias = sweep.config.sweep.alias
    client.set_registered_model_alias(name, alias, str(version))
    return {"registered_model": name, "version": version, "alias": alias, "model_uri": f"models:/{name}@{alias}"}


def results_frame(rows: list[dict], metric: str):
    """The results table: one row per trial, drawn values as columns."""
    import pandas as pd

    records = []
    for r in rows:
        rec = {"trial_id": r["trial_id"], "status": r["status"], "epochs_done": r["epochs_done"],
               f"{metric}_best": r["metric_best"], f"{metric}_last": r["metric_last"],
               "mlflow_run_id": r["mlflow_run_id"] or ""}
        rec.update({k: str(v) if isinstance(v, (list, dict)) else v for k, v in r["params"].items()})
        records.append(rec)
    return pd.DataFrame.from_records(records)


def finish(workdir: Path, sweep, parent_run_id: str, rows: list[dict]) -> dict:
    """Close the sweep in MLflow: child statuses, the results table, plots and summary metrics
    on the parent, the best trial registered. Returns ``rows`` and ``best`` for ``W/sweep.json``."""
    import mlflow

    from pipelines import sweep_plots

    tracking.setup(workdir, sweep.base.tracking.experiment)
    metric = sweep.config.sweep.metric
    _mark_children(rows)
    mode_max = sweep.config.sweep.mode == "max"
    ranked = [r for r in rows if r["model_uri"] and not math.isnan(r["metric_best"])]
    ranked.sort(key=lambda r: r["metric_best"], reverse=mode_max)
    best = dict(ranked[0]) if ranked else {}
    with mlflow.start_run(run_id=parent_run_id):
        frame = results_frame(rows, metric)
        mlflow.log_text(frame.to_json(orient="records", indent=1), "sweep/results.json")  # replaced on a rerun
        mlflow.log_text(frame.to_csv(index=False), "sweep/results.csv")
        counts = {s: sum(r["status"] == s for r in rows) for s in ("completed", "stopped", "errored")}
        mlflow.log_metrics({"sweep/trials": len(rows), **{f"sweep/trials_{k}": v for k, v in counts.items()}})
        for name, fig in sweep_plots.figures(rows, sweep, metric).items():
            mlflow.log_figure(fig, f"sweep/{name}.png")
            sweep_plots.close(fig)
        registered = {}
        if best:
            mlflow.log_metric(f"best/{metric.split('/', 1)[-1]}", best["metric_best"])
            mlflow.set_tags({"medfuse.best_trial_id": best["trial_id"], "medfuse.best_run_id": best["mlflow_run_id"]})
            registered = register_best(sweep, best)
            mlflow.set_tags({f"medfuse.best_{k}": str(v) for k, v in registered.items()})
    best_out = ({"trial_id": best["trial_id"], "mlflow_run_id": best["mlflow_run_id"], "params": best["params"],
                 "metric": metric, "score": best["metric_best"], "trial_model_uri": best["model_uri"], **registered}
                if best else None)
    log.info("sweep: %d trials (%s); best %s", len(rows), json.dumps(counts),
             f"{best['trial_id']} {metric}={best['metric_best']:.4f}" if best else "none")
    return {"trials": rows, "counts": counts, "best": best_out}
