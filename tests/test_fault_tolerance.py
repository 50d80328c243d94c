"""Fault tolerance on a real local Ray cluster: a killed worker, a killed driver, broken checkpoints.

A worker process killed mid-epoch is restarted by Ray Train (``scaling.max_failures``) from the
latest checkpoint; a killed driver resumes when the same command runs again (the Ray Train run
name is kept in the workdir); either way the run's step count and MLflow history are those of one
continuous run. A fresh workdir on shared storage never picks up another run, and a broken or
vanished checkpoint is a loud error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import mlflow
import pytest

from medfuse_core.experiment import load_config
from pipelines import finetune
from pipelines.checkpoints import CheckpointError
from tests.conftest import CPU_EXPERIMENT, REPO, TINY_OVERRIDES

# a few minutes each on 2 cores: outside the default run (`python -m pytest -m heavy`; .ci/run runs them)
pytestmark = [pytest.mark.slow, pytest.mark.heavy]

# small batches: an epoch of several steps, so a kill lands inside one
OVERRIDES = TINY_OVERRIDES + ["train.batch_size=4", "train.log_every_steps=1"]


def _wait_for_checkpoint(storage, timeout=600, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = finetune.find_checkpoints(storage)
        if found:
            return found
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before its first checkpoint")
        time.sleep(0.5)
    raise AssertionError("no checkpoint appeared")


def _history(facts, key):
    client = mlflow.MlflowClient(facts["tracking_uri"])
    return sorted((m.step, m.value) for m in client.get_metric_history(facts["mlflow_run_id"], key))


def _assert_one_continuous_run(facts, epochs):
    states = [s for s, _ in finetune.find_checkpoints(facts["checkpoint_storage"])]
    last = max(states, key=lambda s: s["global_step"])
    steps_per_epoch = last["global_step"] // epochs
    assert last["epoch"] == epochs - 1 and last["global_step"] == epochs * steps_per_epoch > 0
    steps = [step for step, _ in _history(facts, "train/loss")]
    assert steps == list(range(1, epochs * steps_per_epoch + 1)), steps  # every step once, none twice
    epoch_steps = [step for step, _ in _history(facts, "train/loss_epoch")]
    assert epoch_steps == [steps_per_epoch * (e + 1) for e in range(epochs)]
    client = mlflow.MlflowClient(facts["tracking_uri"])
    exp = client.get_experiment_by_name(load_config(CPU_EXPERIMENT, OVERRIDES).tracking.experiment)
    assert len(client.search_runs([exp.experiment_id])) == 1  # the same MLflow run throughout


def test_worker_killed_mid_epoch_recovers_as_one_run(ray_local, tiny_data, tmp_path):
    from ray.util.state import list_actors

    workdir = tmp_path / "w"
    cfg = load_config(CPU_EXPERIMENT, OVERRIDES + ["train.epochs=3", "scaling.max_failures=2"])
    out: dict = {}

    def train():
        try:
            out["facts"] = finetune.run(cfg, tiny_data, workdir)
        except BaseException as exc:  # surfaced below
            out["error"] = exc

    thread = threading.Thread(target=train)
    thread.start()
    _wait_for_checkpoint(workdir / "ray")
    time.sleep(2.0)  # into the second epoch
    workers = [a for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])]
    assert workers, "no live training worker to kill"
    os.kill(int(workers[-1].pid), signal.SIGKILL)
    thread.join(timeout=900)
    assert not thread.is_alive()
    assert "error" not in out, out.get("error")
    facts = out["facts"]
    started = list_actors(filters=[("class_name", "=", "RayTrainWorker")], limit=1000)
    assert len({a.actor_id for a in started}) > cfg.scaling.num_workers  # a new worker group was started
    _assert_one_continuous_run(facts, epochs=3)
    assert (workdir / "model" / "medfuse_model.json").is_file()


def test_killed_driver_resumes_with_the_same_command(tiny_data, tmp_path):
    workdir = tmp_path / "w"
    cmd = [sys.executable, "-m", "pipelines.cli", "finetune", "--config", str(CPU_EXPERIMENT), "--data",
           str(tiny_data), "--workdir", str(workdir), *OVERRIDES, "train.epochs=3"]
    env = {**os.environ, "MEDFUSE_PROGRESS": "0"}
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_checkpoint(workdir / "ray", proc=proc)
        time.sleep(1.0)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local cluster it started
        proc.wait()
    first = json.loads((workdir / "finetune.json").read_text())
    assert "model_uri" not in first  # it was stopped before the end

    again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    facts = json.loads((workdir / "finetune.json").read_text())
    assert facts["mlflow_run_id"] == first["mlflow_run_id"] and facts["train_run_name"] == first["train_run_name"]
    assert [p.name for p in (workdir / "ray").iterdir() if p.is_dir()] == [first["train_run_name"]]
    run = mlflow.MlflowClient(facts["tracking_uri"]).get_run(facts["mlflow_run_id"])
    assert int(run.data.tags["medfuse.resumed_from_step"]) > 0
    _assert_one_continuous_run(facts, epochs=3)


def test_shared_storage_fresh_workdir_and_broken_checkpoints(ray_local, tiny_data, tmp_path):
    shared = tmp_path / "shared-storage"
    one = load_config(CPU_EXPERIMENT, OVERRIDES + ["train.epochs=2", f"checkpoint.storage={shared}"])
    first = finetune.run(one, tiny_data, tmp_path / "a")
    assert first["checkpoint_storage"] == str(shared)
    assert not (tmp_path / "a" / "ray").exists()  # the checkpoints went to the configured storage

    second = finetune.run(load_config(CPU_EXPERIMENT, OVERRIDES + ["train.epochs=1", f"checkpoint.storage={shared}"]),
                          tiny_data, tmp_path / "b")
    assert second["train_run_name"] != first["train_run_name"]
    b_states = [s for s, _ in finetune.find_checkpoints(shared, second["train_run_name"])]
    a_states = [s for s, _ in finetune.find_checkpoints(shared, first["train_run_name"])]
    assert [s["epoch"] for s in b_states] == [0]  # started afresh, not from the other run's epoch 2
    assert min(s["global_step"] for s in a_states) == b_states[0]["global_step"]

    # the latest checkpoint of run A loses a file: resuming is a loud error, not a silent restart
    state, folder = finetune.find_checkpoints(shared, first["train_run_name"])[-1]
    manifest = json.loads((folder / "ranks" / "rank-0.json").read_text())
    victim = next(f for f in manifest["files"] if f.startswith("deepspeed/"))
    (folder / victim).unlink()
    more = load_config(CPU_EXPERIMENT, OVERRIDES + ["train.epochs=3", f"checkpoint.storage={shared}",
                                                    "scaling.max_failures=0"])
    with pytest.raises(Exception, match="incomplete"):
        finetune.run(more, tiny_data, tmp_path / "a")

    # every checkpoint gone: the driver refuses before starting anything
    import shutil

    shutil.rmtree(shared / first["train_run_name"])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        finetune.run(more, tiny_data, tmp_path / "a")


MULTI_NODE_SCRIPT = r"""
import sys
from ray.cluster_utils import Cluster
import ray
from medfuse_core.config import ConfigError
from medfuse_core.experiment import load_config
from pipelines.training import check_cluster_settings

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
cluster.add_node(num_cpus=1)
ray.init(address=cluster.address)
cluster.wait_for_nodes()
cfg = load_config(sys.argv[1], [])
try:
    check_cluster_settings(cfg, sys.argv[2], "sqlite:///" + sys.argv[2] + "/mlflow.db")
    print("SQLITE-ACCEPTED")
except ConfigError as err:
    print("SQLITE-REFUSED", err)
check_cluster_settings(cfg, sys.argv[2], "http://mlflow.example:5000")  # both nodes see this path
print("SHARED-ACCEPTED")
ray.shutdown()
cluster.shutdown()
"""


def test_multi_node_run_refuses_an_sqlite_store_and_probes_storage(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", MULTI_NODE_SCRIPT, str(CPU_EXPERIMENT), str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SQLITE-REFUSED MLFLOW_TRACKING_URI: this cluster has 2 nodes" in proc.stdout
    assert "SHARED-ACCEPTED" in proc.stdout
    assert not list(tmp_path.glob(".medfuse-probe-*"))  # the probe file is cleaned up
