"""A resumed training run logs each (metric, step) once, against a real MLflow store."""

from __future__ import annotations

import mlflow

from pipelines.train_loop import _MlflowSink


def test_a_resumed_run_logs_what_the_killed_attempt_had_not(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id
    first = _MlflowSink(uri, run_id, True)
    for step in range(1, 9):
        first.log({"train/loss": 1.0 / step}, step)
    first.log({"val/auroc_macro": 0.6}, 4)  # epoch 1 validated and checkpointed at step 4
    # killed after epoch 2's last loss (step 8), before its validation

    second = _MlflowSink(uri, run_id, True)
    second.resume_after()
    for step in range(5, 9):  # the restored run repeats epoch 2 from the step-4 checkpoint
        second.log({"train/loss": 2.0}, step)
    second.log({"val/auroc_macro": 0.7, "train/loss_epoch": 0.5}, 8)

    loss = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in loss) == list(range(1, 9)) and 2.0 not in {m.value for m in loss}
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val/auroc_macro")) == [(4, 0.6), (8, 0.7)]
    assert [m.step for m in client.get_metric_history(run_id, "train/loss_epoch")] == [8]


def test_a_sink_without_a_run_logs_nothing():
    sink = _MlflowSink(None, None, True)
    sink.resume_after()
    sink.log({"train/loss": 1.0}, 1)  # no client: a no-op, not an error
