"""``medfuse promote`` against a real MLflow registry: candidate -> champion only when it wins."""

from __future__ import annotations

import json

import mlflow
import pytest

from pipelines.cli import main


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def _register(score: float) -> str:
    with mlflow.start_run() as run:
        mlflow.log_metric("best/auroc_macro", score)
        mlflow.pyfunc.log_model(name="model", python_model=_Echo(), registered_model_name="m")
    client = mlflow.MlflowClient()
    version = max(client.search_model_versions("name='m'"), key=lambda v: int(v.version))
    client.set_registered_model_alias("m", "candidate", version.version)
    return run.info.run_id


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    mlflow.set_experiment("promote-test")
    return tmp_path


def _promote(capsys, *extra):
    code = main(["promote", "--name", "m", *extra])
    return code, json.loads(capsys.readouterr().out)


def test_the_first_candidate_becomes_champion_and_a_worse_one_does_not(store, capsys):
    _register(0.80)
    code, first = _promote(capsys)
    assert code == 0 and first["promoted"] and first["reason"] == "no champion yet"
    client = mlflow.MlflowClient()
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    _register(0.78)
    code, worse = _promote(capsys)
    assert code == 1 and not worse["promoted"] and str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert "refused" in client.get_model_version("m", "2").tags["medfuse.promotion"]
    _register(0.81)
    code, small = _promote(capsys, "--min-gain", "0.02")
    assert code == 1 and not small["promoted"]
    code, better = _promote(capsys)
    assert code == 0 and better["promoted"] and str(client.get_model_version_by_alias("m", "champion").version) == "3"


def test_promote_names_a_missing_alias_or_metric(store, capsys):
    assert main(["promote", "--name", "m"]) == 2
    assert "candidate" in capsys.readouterr().err
    _register(0.5)
    assert main(["promote", "--name", "m", "--metric", "val/nothing"]) == 2
    assert "val/nothing" in capsys.readouterr().err
