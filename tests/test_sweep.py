"""``medfuse sweep`` end to end on a real local Ray cluster: Tune trials that are full Ray Train +
DeepSpeed runs, ASHA stopping the weak ones, parent and child runs in a real MLflow store, the
``sweep-best`` alias; a rerun adds nothing; a driver killed mid-sweep resumes with the same
command, no trial trained twice and no duplicate MLflow run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from medfuse_core.sweep_config import load_sweep
from pipelines import sweep as sweep_mod
from pipelines.sweep_tracking import STATUS_TAG, TRIAL_TAG

from tests.conftest import TINY_OVERRIDES

# ~10 minutes on 2 cores: outside the default run (`python -m pytest -m heavy`; .ci/run runs them)
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

REPO = Path(__file__).resolve().parents[1]


def _sweep_file(tmp: Path, space: dict, sweep: dict, epochs: int) -> Path:
    """A sweep over the CPU experiment at the tests' tiny size."""
    overrides = {}
    for text in TINY_OVERRIDES:
        key, value = text.split("=", 1)
        overrides[key] = yaml.safe_load(value)
    overrides.update({"train.epochs": epochs, "scaling.num_workers": 1, "scaling.cpus_per_worker": 1})
    doc = {"name": "tiny_sweep", "stage": "finetune", "base": str(REPO / "experiments" / "finetune_cxr_cpu.yaml"),
           "overrides": overrides, "sweep": {**sweep, "space": space}}
    path = tmp / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _children(workdir: Path, parent: str):
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the process's last registry
    exp = client.get_experiment_by_name("medfuse-cxr")
    return client, client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")


@pytest.fixture(scope="module")
def asha_sweep(ray_local, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    # a learning rate that cannot learn, run after one that can: ASHA must stop it after its first
    # epoch (on the training loss, which moves for certain even on the tiny validate split)
    path = _sweep_file(tmp, {"train.lr": {"grid": [3.0e-3, 1.0e-9]}, "model.fusion.name": {"choice": ["concat", "gated"]}},
                       {"metric": "train/loss_epoch", "mode": "min", "num_samples": 2,
                        "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2}}, epochs=2)
    plan = load_sweep(path)
    facts = sweep_mod.run(plan, tiny_data, tmp / "w")
    return plan, tmp / "w", facts


def test_trials_run_and_asha_stops_the_weak_ones(asha_sweep):
    plan, workdir, facts = asha_sweep
    trials = facts["trials"]
    assert len(trials) == 4
    by_lr = {}
    for t in trials:
        by_lr.setdefault(t["params"]["train.lr"], []).append(t)
    assert all(t["status"] == "completed" and t["epochs_done"] == 2 for t in by_lr[3.0e-3])
    assert all(t["status"] == "stopped" and t["epochs_done"] == 1 for t in by_lr[1.0e-9])
    assert facts["best"]["params"]["train.lr"] == 3.0e-3
    assert json.loads((workdir / "sweep.json").read_text())["best"]["trial_id"] == facts["best"]["trial_id"]
    # each trial trained in its own workdir, with its own Ray Train run
    for t in trials:
        assert list((workdir / "trials" / t["trial_id"] / "ray").glob("trial-*/checkpoint_*"))
    # stopped trials gave their workers back: the whole cluster is free again once the sweep ends
    import ray

    deadline = time.time() + 60
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"] and time.time() < deadline:
        time.sleep(1)
    assert ray.available_resources().get("CPU", 0) == ray.cluster_resources()["CPU"]


def test_parent_and_child_runs_in_mlflow_and_the_alias(asha_sweep):
    plan, workdir, facts = asha_sweep
    client, children = _children(workdir, facts["parent_run_id"])
    parent = client.get_run(facts["parent_run_id"])
    assert parent.data.tags["medfuse.stage"] == "sweep" and parent.info.status == "FINISHED"
    assert parent.data.params["sweep.scheduler.name"] == "asha"
    assert parent.data.metrics["sweep/trials"] == 4 and parent.data.metrics["sweep/trials_stopped"] == 2
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    for name in ("space.json", "results.json", "results.csv", "metric_vs_params.png", "learning_curves.png",
                 "parallel_coordinates.png"):
        assert f"sweep/{name}" in artifacts, name
    assert len(children) == 4
    assert len({c.data.tags[TRIAL_TAG] for c in children}) == 4
    statuses = {c.data.tags[TRIAL_TAG]: (c.data.tags[STATUS_TAG], c.info.status) for c in children}
    for t in facts["trials"]:
        assert statuses[t["trial_id"]] == (t["status"], "FINISHED" if t["status"] == "completed" else "KILLED")
    child = client.get_run(facts["best"]["mlflow_run_id"])
    assert child.data.params["train.lr"] == str(3.0e-3) and "train/loss" in child.data.metrics
    assert child.data.tags["medfuse.sweep.train.lr"] == str(3.0e-3)
    version = client.get_model_version_by_alias("medfuse-cxr-diagnosis", "sweep-best")
    assert version.run_id == facts["best"]["mlflow_run_id"]
    assert int(version.version) == facts["best"]["version"]
    # trials log their models without registering them: the sweep registers only its best
    assert len(client.search_model_versions("name='medfuse-cxr-diagnosis'")) == 1


def test_rerunning_a_finished_sweep_adds_nothing(asha_sweep, tiny_data):
    plan, workdir, facts = asha_sweep
    again = sweep_mod.run(plan, tiny_data, workdir)
    client, children = _children(workdir, facts["parent_run_id"])
    assert len(children) == 4 and again["parent_run_id"] == facts["parent_run_id"]
    assert again["best"]["trial_id"] == facts["best"]["trial_id"]
    assert len(client.search_model_versions("name='medfuse-cxr-diagnosis'")) == 1
    assert [t["status"] for t in again["trials"]] == [t["status"] for t in facts["trials"]]


def test_a_sweep_with_other_settings_is_refused_in_the_same_workdir(asha_sweep, tiny_data, tmp_path):
    from medfuse_core.config import ConfigError

    plan, workdir, _ = asha_sweep
    other = load_sweep(_sweep_file(tmp_path, {"train.lr": {"choice": [1e-3]}}, {"num_samples": 1}, epochs=2))
    with pytest.raises(ConfigError, match="--workdir: resuming a sweep run with other settings"):
        sweep_mod.run(other, tiny_data, workdir)


def _wait_for(predicate, proc, limit: float, what: str):
    deadline = time.time() + limit
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the sweep ended (rc {proc.returncode}) before {what}")
        time.sleep(1.0)
    pytest.fail(f"timed out waiting for {what}")


def test_a_killed_sweep_resumes_with_the_same_command(tiny_data, tmp_path):
    path = _sweep_file(tmp_path, {"model.fusion.name": {"grid": ["concat", "gated"]}},
                       {"num_samples": 1, "scheduler": {"name": "fifo"}}, epochs=2)
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "pipelines.cli", "sweep", "--config", str(path), "--data", str(tiny_data),
           "--workdir", str(workdir)]
    env = {**os.environ, "MEDFUSE_PROGRESS": "0", "RAY_ADDRESS": ""}
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def finished_trials():
        return [p for p in (workdir / "trials").glob("*/finetune.json") if json.loads(p.read_text()).get("model_uri")]

    def mid_trial():  # one trial done, another with a checkpoint but not done
        done = {p.parent.name for p in finished_trials()}
        started = {p.parents[3].name for p in (workdir / "trials").glob("*/ray/trial-*/checkpoint_*/train_state.json")}
        return len(done) == 1 and bool(started - done)

    try:
        _wait_for(mid_trial, proc, 900, "one trial finished and a second checkpointed")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = {p.parent.name for p in finished_trials()}
    facts = json.loads((workdir / "sweep.json").read_text())
    assert "trials" not in facts  # it really was stopped mid-sweep

    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    facts = json.loads((workdir / "sweep.json").read_text())
    assert [t["status"] for t in facts["trials"]] == ["completed"] * 2
    client, children = _children(workdir, facts["parent_run_id"])
    assert len(children) == 2 and len({c.data.tags[TRIAL_TAG] for c in children}) == 2
    for child in children:
        trial = child.data.tags[TRIAL_TAG]
        history = client.get_metric_history(child.info.run_id, "val/auroc_macro")
        assert len(history) == 2 and len({m.step for m in history}) == 2, trial  # every epoch validated once
        if trial in done_before:  # finished before the kill: never trained again
            assert "medfuse.resumed_from_step" not in child.data.tags
    resumed = [c for c in children if "medfuse.resumed_from_step" in c.data.tags]
    assert len(resumed) == 1  # the interrupted trial continued its own run from its checkpoint
    version = client.get_model_version_by_alias("medfuse-cxr-diagnosis", "sweep-best")
    assert version.run_id == facts["best"]["mlflow_run_id"]
    assert len(client.search_model_versions("name='medfuse-cxr-diagnosis'")) == 1
