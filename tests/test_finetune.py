"""Two Ray Train workers, real DeepSpeed (gloo, ZeRO-2) on CPU, real MLflow: learning and resume."""

from __future__ import annotations

import json

import mlflow
import pytest

from medfuse_core.experiment import load_config
from pipelines import finetune
from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def first_run(tiny_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("finetune") / "w"
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=3"] + AVERAGE)
    facts = finetune.run(cfg, tiny_data, workdir)
    return workdir, facts


AVERAGE = ["train.ema_decay=0.8"]  # the first run keeps a weight average: its swap, save and resume under ZeRO-2


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
    assert {m.value for m in client.get_metric_history(run.info.run_id, "perf/torch_threads")} == {1.0}
    assert run.data.params["model.fusion.name"] == load_config(CPU_EXPERIMENT, TINY_OVERRIDES).model.fusion.name
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert run.inputs.dataset_inputs, "dataset digest logged as a run input"
    versions = client.search_model_versions("name='medfuse-cxr-diagnosis'")
    assert any(v.run_id == run.info.run_id for v in versions)
    assert (workdir / "model" / "medfuse_model.json").is_file()
    states = [s for s, _ in finetune.find_checkpoints(workdir / "ray")]
    assert max(s["epoch"] for s in states) == 2


def test_the_saved_model_holds_the_weight_average(first_run):
    import torch

    from medfuse_core.models.bundle import load_bundle
    from pipelines.weight_average import AVERAGE_FILE

    workdir, _ = first_run
    state, folder = max(finetune.find_checkpoints(workdir / "ray"), key=lambda item: item[0]["global_step"])
    saved = torch.load(folder / AVERAGE_FILE, weights_only=True)
    assert saved["updates"] == state["global_step"] and saved["decay"] == 0.8
    live = torch.load(next((folder / "deepspeed").rglob("mp_rank_00_model_states.pt")), weights_only=False)["module"]
    bundle = load_bundle(folder / "bundle").model.state_dict()
    name = state["trainable"][-1]
    torch.testing.assert_close(bundle[name].float(), saved["average"][name])  # the bundle holds the average
    assert not torch.allclose(live[name].float(), saved["average"][name])  # DeepSpeed keeps the live weights
    assert set(state["trainable"]) <= set(saved["average"])


def test_the_model_is_calibrated_on_validation_before_it_is_logged(first_run):
    workdir, facts = first_run
    meta = json.loads((workdir / "model" / "medfuse_model.json").read_text())
    cal, n_labels = meta["extra"]["calibration"], len(meta["label_names"])
    assert cal["fitted_on"] == "validate" and cal["n"] > 0
    for mode in ("image_only", "image_text"):
        assert len(cal["temperatures"][mode]) == n_labels and all(0.05 <= t <= 20 for t in cal["temperatures"][mode])
        assert len(meta["extra"]["thresholds"][mode]) == n_labels
    client = mlflow.MlflowClient(facts["tracking_uri"])
    run = client.get_run(facts["mlflow_run_id"])
    assert {"val/image_text/ece_macro_before", "val/image_text/ece_macro_after"} <= set(run.data.metrics)
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "calibration")}
    assert "calibration/reliability_validate_image_text.png" in figures
    # the model card travels with the model and sits on the run page
    card = (workdir / "model" / "MODEL_CARD.md").read_text()
    for section in ("## Intended use", "## Data", "## Validation", "## Limits"):
        assert section in card
    assert "MODEL_CARD.md" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_rerun_resumes_from_last_checkpoint(first_run, tiny_data):
    workdir, facts = first_run
    before = max(s["global_step"] for s, _ in finetune.find_checkpoints(workdir / "ray"))
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=4"] + AVERAGE)
    again = finetune.run(cfg, tiny_data, workdir)
    assert again["mlflow_run_id"] == facts["mlflow_run_id"]
    states = [s for s, _ in finetune.find_checkpoints(workdir / "ray")]
    last = max(states, key=lambda s: s["global_step"])
    assert last["epoch"] == 3
    steps_per_epoch = before // 3
    assert last["global_step"] == before + steps_per_epoch  # continued, not restarted
    import torch

    from pipelines.weight_average import AVERAGE_FILE

    folder = next(f for s, f in finetune.find_checkpoints(workdir / "ray") if s["global_step"] == last["global_step"])
    assert torch.load(folder / AVERAGE_FILE, weights_only=True)["updates"] == last["global_step"]  # the average resumed too
    run = mlflow.MlflowClient(facts["tracking_uri"]).get_run(facts["mlflow_run_id"])
    assert run.data.tags["medfuse.resumed_from_step"] == str(before)
    assert json.loads((workdir / "finetune.json").read_text())["mlflow_run_id"] == facts["mlflow_run_id"]


def test_resume_refuses_changed_settings(first_run, tiny_data):
    from medfuse_core.config import ConfigError

    workdir, _ = first_run
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=3", "train.lr=0.01"] + AVERAGE)
    with pytest.raises(ConfigError, match="train.lr"):
        finetune.run(cfg, tiny_data, workdir)


@pytest.mark.heavy  # 1-3 min on 2 cores: keeps the default run under 20 min; CI runs -m heavy
def test_zero3_with_fewer_validation_batches_than_workers(tiny_data, tmp_path):
    """ZeRO-3 gathers parameters in every forward: a rank with no validation batch must pad, not hang."""
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["deepspeed.zero_stage=3", "train.ema_decay=0", "train.batch_size=16",
                                                        "train.epochs=1"])
    summary = json.loads((tiny_data / "ingest_summary.json").read_text())
    assert summary["splits"]["validate"] <= cfg.train.batch_size  # one validation batch for two workers
    facts = finetune.run(cfg, tiny_data, tmp_path / "w")
    assert facts["best_epoch"] == 0
    from medfuse_core.models.bundle import load_bundle

    bundle = load_bundle(tmp_path / "w" / "model")  # consolidated ZeRO-3 weights load into a full model
    assert bundle.model.num_labels == 14


def _summary(**over):
    base = {"splits": {"train": 64, "validate": 8}, "labelled_images_per_split": {"train": 64, "validate": 8},
            "label_positives": {"train": {"Edema": 5}}, "image_size": 48, "digest": "d"}
    base.update(over)
    return base


def test_check_data_refuses_data_that_cannot_train():
    from medfuse_core.config import ConfigError
    from medfuse_core.data.sources import SourceError

    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES)
    assert finetune.check_data(cfg, _summary()) == (64, 8)
    with pytest.raises(SourceError, match="no positive|none of the configured labels"):
        finetune.check_data(cfg, _summary(label_positives={"train": {}}))
    with pytest.raises(SourceError, match="labelled training images"):
        finetune.check_data(cfg, _summary(labelled_images_per_split={"train": 8, "validate": 8}))
    big = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["data.image_size=96"])
    with pytest.raises(ConfigError, match="data.image_size.*--image-size 96"):
        finetune.check_data(big, _summary())
    allowed = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["data.image_size=96", "data.allow_resize=true"])
    assert finetune.check_data(allowed, _summary()) == (64, 8)


def test_cli_refuses_a_label_table_without_positives(tiny_data, tmp_path, capsys):
    """The CLI exits 2 with a message, and writes no workdir, when the configured labels have no positive."""
    from pipelines.cli import main

    code = main(["finetune", "--config", str(CPU_EXPERIMENT), "--data", str(tiny_data), "--workdir",
                 str(tmp_path / "w"), *TINY_OVERRIDES, "data.labels=[Fracture, Pleural Other]"])
    summary = json.loads((tiny_data / "ingest_summary.json").read_text())
    if any(summary["label_positives"]["train"].get(n) for n in ("Fracture", "Pleural Other")):
        pytest.skip("the tiny corpus happens to have a positive for these labels")
    assert code == 2
    assert "data.labels" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


@pytest.mark.heavy  # 1-3 min on 2 cores: keeps the default run under 20 min; CI runs -m heavy
def test_zero0_checkpoints_resume_and_refuse_other_data(tiny_data, tmp_path):
    """ZeRO stage 0 writes no ZeRO optimizer shards; its checkpoints must still count and resume."""
    from medfuse_core.data.sources import SourceError

    workdir = tmp_path / "w"
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["deepspeed.zero_stage=0", "train.epochs=1",
                                                        "scaling.torch_threads=2"])
    facts = finetune.run(cfg, tiny_data, workdir)
    assert facts["best_epoch"] == 0 and facts["model_uri"]
    threads = mlflow.MlflowClient(facts["tracking_uri"]).get_metric_history(facts["mlflow_run_id"],
                                                                            "perf/torch_threads")
    assert [m.value for m in threads] == [2.0]  # apart from the 0.5-CPU reservation
    first = finetune.find_checkpoints(workdir / "ray")
    assert [s["epoch"] for s, _ in first] == [0]
    cfg2 = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["deepspeed.zero_stage=0", "train.epochs=2"])
    finetune.run(cfg2, tiny_data, workdir)
    states = [s for s, _ in finetune.find_checkpoints(workdir / "ray")]
    assert max(s["epoch"] for s in states) == 1
    assert max(s["global_step"] for s in states) == 2 * first[0][0]["global_step"]  # continued, not restarted

    # a checkpoint missing a file its rank listed is not complete
    state, folder = finetune.find_checkpoints(workdir / "ray")[-1]
    manifest = json.loads((folder / "ranks" / "rank-0.json").read_text())
    assert json.loads((folder / "ranks" / "rank-1.json").read_text())["files"] == {}  # ZeRO-0: rank 0 saves
    victim = next(f for f in manifest["files"] if f.startswith("deepspeed/"))
    (folder / victim).unlink()
    assert folder not in [f for _, f in finetune.find_checkpoints(workdir / "ray")]

    # resuming against other data is refused
    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_data, other)
    summary = json.loads((other / "ingest_summary.json").read_text())
    summary["digest"] = "0" * 64
    (other / "ingest_summary.json").write_text(json.dumps(summary))
    cfg3 = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["deepspeed.zero_stage=0", "train.epochs=3"])
    with pytest.raises(SourceError, match="digest"):
        finetune.run(cfg3, other, workdir)
