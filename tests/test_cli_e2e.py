"""The CLI end to end on a tiny corpus: quickstart, then evaluate by run id and by registry URI."""

from __future__ import annotations

import json

import pytest

from pipelines.cli import main
from tests.conftest import TINY_OVERRIDES

pytestmark = pytest.mark.slow


def test_quickstart_then_evaluate_by_run_and_registry(ray_local, tmp_path, capsys):
    workdir = tmp_path / "qs"
    code = main(["quickstart", "--workdir", str(workdir), "--studies", "70", "--seed", "3",
                 *TINY_OVERRIDES, "train.epochs=1", "model.fusion.name=co_attention"])  # attention maps
    assert code == 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    for mode in ("image_only", "image_text"):
        assert set(metrics[mode]) >= {"auroc", "auroc_macro", "auprc", "f1"}
        assert metrics[mode]["auroc"], "at least one label scored"
    out = capsys.readouterr().out
    assert "mlflow ui --backend-store-uri" in out

    facts = json.loads((workdir / "train" / "finetune.json").read_text())
    import mlflow

    mlflow.set_tracking_uri(facts["tracking_uri"])

    def evaluation_artifacts() -> set[str]:
        return {a.path for a in mlflow.MlflowClient().list_artifacts(facts["mlflow_run_id"], "evaluation")}

    # patient images only on request: quickstart's evaluate logs the plots but no attention maps
    assert {"evaluation/roc_curves.png", "evaluation/per_label_auroc.png"} <= evaluation_artifacts()
    assert "evaluation/attention_maps.png" not in evaluation_artifacts()
    by_run = tmp_path / "by_run.json"
    assert main(["evaluate", "--model", facts["mlflow_run_id"], "--data", str(workdir / "data"),
                 "--out", str(by_run), "--log-images"]) == 0
    assert "evaluation/attention_maps.png" in evaluation_artifacts()
    by_alias = tmp_path / "by_alias.json"
    assert main(["evaluate", "--model", "models:/medfuse-cxr-diagnosis@candidate", "--data",
                 str(workdir / "data"), "--out", str(by_alias)]) == 0
    a = json.loads(by_run.read_text())["image_text"]["auroc_macro"]
    b = json.loads(by_alias.read_text())["image_text"]["auroc_macro"]
    assert a == pytest.approx(metrics["image_text"]["auroc_macro"]) and a == pytest.approx(b)

    ingest_runs = mlflow.search_runs(experiment_names=["medfuse-ingest"], output_format="list")
    assert len(ingest_runs) == 1 and ingest_runs[0].data.metrics["ingest/n_ok"] > 0
    run = mlflow.MlflowClient().get_run(facts["mlflow_run_id"])
    assert "test/image_text/auroc_macro" in run.data.metrics

    # the registered model serves through MLflow's pyfunc interface
    import numpy as np
    import pandas as pd

    model = mlflow.pyfunc.load_model("models:/medfuse-cxr-diagnosis@candidate")
    dicom = next((workdir / "corpus").rglob("*.dcm")).read_bytes()
    out = model.predict(pd.DataFrame({"dicom": [dicom, dicom, b"not a dicom file"],
                                      "context": ["shortness of breath", "", ""]}))
    probs = out[[c for c in out.columns if c.startswith("prob:")]].to_numpy()
    assert probs.shape == (3, 14) and ((probs[:2] > 0) & (probs[:2] < 1)).all() and np.isnan(probs[2]).all()
    assert list(out["context_used"]) == [1, 0, 0] and out["error"][2] and not out["error"][0]
