"""Two Ray Train workers, real DeepSpeed (gloo, ZeRO-2) on CPU, real MLflow: learning and resume."""

from __future__ import annotations

import json

import mlflow
import pytest

from medfuse_core.config import load_config
from pipelines import finetune
from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tiny_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune") / "w"
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=3"])
    facts = finetune.run(cfg, tiny_data, workdir)
    return workdir, facts


def test_finetune_learns_and_tracks(first_run):
    workdir, facts = first_run
    client = mlflow.MlflowClient(facts["tracking_uri"])
    run = client.get_run(facts["mlflow_run_id"])
    steps = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(steps) >= 3
    epochs = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss_epoch"),
                                      key=lambda m: m.step)]
    assert len(epochs) == 3 and epochs[-1] < epochs[0], epochs  # the mean training loss fell
    assert client.get_metric_history(run.info.run_id, "perf/samples_per_sec")
    assert run.data.params["model.fusion.name"] == "co_attention"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert run.inputs.dataset_inputs, "dataset digest logged as a run input"
    versions = client.search_model_versions("name='medfuse-cxr-diagnosis'")
    assert any(v.run_id == run.info.run_id for v in versions)
    assert (workdir / "model" / "medfuse_model.json").is_file()
    states = [s for s, _ in finetune.find_checkpoints(workdir)]
    assert max(s["epoch"] for s in states) == 2


def test_rerun_resumes_from_last_checkpoint(first_run, tiny_data):
    workdir, facts = first_run
    before = max(s["global_step"] for s, _ in finetune.find_checkpoints(workdir))
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=4"])
    again = finetune.run(cfg, tiny_data, workdir)
    assert again["mlflow_run_id"] == facts["mlflow_run_id"]
    states = [s for s, _ in finetune.find_checkpoints(workdir)]
    last = max(states, key=lambda s: s["global_step"])
    assert last["epoch"] == 3
    steps_per_epoch = before // 3
    assert last["global_step"] == before + steps_per_epoch  # continued, not restarted
    run = mlflow.MlflowClient(facts["tracking_uri"]).get_run(facts["mlflow_run_id"])
    assert run.data.tags["medfuse.resumed_from_step"] == str(before)
    assert json.loads((workdir / "finetune.json").read_text())["mlflow_run_id"] == facts["mlflow_run_id"]


def test_resume_refuses_changed_settings(first_run, tiny_data):
    from medfuse_core.config import ConfigError

    workdir, _ = first_run
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=3", "train.lr=0.01"])
    with pytest.raises(ConfigError, match="train.lr"):
        finetune.run(cfg, tiny_data, workdir)


def test_zero3_with_fewer_validation_batches_than_workers(tiny_data, tmp_path):
    """ZeRO-3 gathers parameters in every forward: a rank with no validation batch must pad, not hang."""
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["deepspeed.zero_stage=3", "train.batch_size=16",
                                                        "train.epochs=1"])
    summary = json.loads((tiny_data / "ingest_summary.json").read_text())
    assert summary["splits"]["validate"] <= cfg.train.batch_size  # one validation batch for two workers
    facts = finetune.run(cfg, tiny_data, tmp_path / "w")
    assert facts["best_epoch"] == 0
    from medfuse_core.models.bundle import load_bundle

    bundle = load_bundle(tmp_path / "w" / "model")  # consolidated ZeRO-3 weights load into a full model
    assert bundle.model.num_labels == 14
