"""Report generation end to end on a real local Ray cluster: ``medfuse train-report`` (2 workers,
DeepSpeed ZeRO-2, a tiny Llama built from a config as the decoder LLM), then ``medfuse report``
on a DICOM file, ``medfuse generate`` over the test split, ``medfuse evaluate`` with its
``report_generation`` metrics in MLflow, and the registered model served as a pyfunc."""

from __future__ import annotations

import csv
import json

import mlflow
import pandas as pd
import pytest
import pyarrow.dataset as pads

from medfuse_core.config import ReportConfig
from medfuse_core.evaluation.metrics import NEVER_FLAG
from medfuse_core.evaluation.report_metrics import has_findings_and_impression
from medfuse_core.experiment import load_config
from medfuse_core.models.tiny_lm import save_tiny_causal_lm
from pipelines import train_report
from pipelines.cli import main
from pipelines.shards import split_dir

from tests.conftest import REPO

REPORT_CPU = REPO / "experiments" / "report_cxr_cpu.yaml"

# about 3 min on 2 cores: outside the default run (`python -m pytest -m heavy`; .ci/run runs them)
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    lm = save_tiny_causal_lm(root / "tiny-llama", "llama", hidden=64, layers=2, heads=2)
    overrides = ["data.image_size=48", f"model.lm.name_or_path={lm}", "model.lm.trainable_layers=-1",
                 "data.max_report_tokens=48", "data.max_context_tokens=12", "train.batch_size=8", "train.epochs=1",
                 "train.warmup_steps=1", "train.log_every_steps=2", "train.text_lr=3e-3",
                 "decoding.max_new_tokens=12", "model.guidance.enabled=true"]  # the guided path is the superset
    cfg = load_config(REPORT_CPU, overrides, schema=ReportConfig)
    workdir = root / "w"
    return workdir, train_report.run(cfg, tiny_data, workdir)


def test_train_report_logs_and_registers_a_report_model(trained):
    workdir, facts = trained
    assert facts["score_key"] == "val/token_accuracy" and 0.0 <= facts["best_score"] <= 1.0
    meta = json.loads((workdir / "model" / "medfuse_model.json").read_text())
    assert meta["kind"] == "report" and meta["extra"]["decoding"]["max_new_tokens"] == 12
    thresholds = meta["extra"]["guide_thresholds"]  # chosen on validate when training ended
    assert list(thresholds) == meta["model_config"]["guidance"]["labels"]
    assert all(0.0 <= t <= 1.0 or t == NEVER_FLAG for t in thresholds.values())
    mined = meta["extra"]["flag_sentences"]  # the training reports' sentences per set of findings
    assert set(mined) == {"findings", "impression"} and mined["findings"] and mined["impression"]
    assert all(set(e["labels"]) <= set(thresholds) and e["text"] for s in mined.values() for e in s)
    client = mlflow.MlflowClient(facts["tracking_uri"], registry_uri=facts["tracking_uri"])
    run = client.get_run(facts["mlflow_run_id"])
    assert run.data.tags["medfuse.stage"] == "report" and "val/perplexity" in run.data.metrics
    assert run.data.metrics["val/guide/n"] >= 1
    assert len(client.get_metric_history(facts["mlflow_run_id"], "train/loss")) >= 1
    version = client.get_model_version_by_alias("medfuse-cxr-report", "candidate")
    assert version.run_id == facts["mlflow_run_id"]


def test_report_command_drafts_both_sections_for_a_dicom_file(trained, tiny_corpus, capsys):
    workdir, _ = trained
    dicom = next(tiny_corpus.rglob("*.dcm"))
    assert main(["report", "--model", str(workdir), "--dicom", str(dicom), "--context", "Cough."]) == 0
    draft = capsys.readouterr().out.strip()
    assert draft.startswith("FINDINGS:") and "\nIMPRESSION:" in draft and has_findings_and_impression(draft)


def test_report_command_errors_name_the_problem(trained, tmp_path, capsys):
    workdir, _ = trained
    not_dicom = tmp_path / "x.dcm"
    not_dicom.write_bytes(b"not a dicom file")
    assert main(["report", "--model", str(workdir), "--dicom", str(not_dicom)]) == 2
    assert "--dicom" in capsys.readouterr().err
    assert main(["report", "--model", str(workdir), "--dicom", str(not_dicom), "decoding.num_beams=0"]) == 2
    assert "decoding.num_beams" in capsys.readouterr().err


def test_generate_writes_one_row_per_test_image(trained, tiny_data, tmp_path):
    workdir, _ = trained
    out = tmp_path / "reports.csv"
    assert main(["generate", "--model", str(workdir), "--data", str(tiny_data), "--split", "test",
                 "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    ids = pads.dataset(str(split_dir(tiny_data, "test")), format="parquet", partitioning=None).to_table(
        columns=["image_id"]).column("image_id").to_pylist()
    assert sorted(r["record_id"] for r in rows) == sorted(ids)
    assert all(has_findings_and_impression(r["report"]) for r in rows)
    assert not list(tmp_path.glob(".*partial"))
    # the drafts made to state the head's flags: every row still has both sections
    agreed = tmp_path / "agreed.csv"
    assert main(["generate", "--model", str(workdir), "--data", str(tiny_data), "--split", "test",
                 "--out", str(agreed), "decoding.flag_agreement=exact"]) == 0
    with open(agreed, newline="") as fh:
        agreed_rows = list(csv.DictReader(fh))
    assert sorted(r["record_id"] for r in agreed_rows) == sorted(ids)   # rows come in Ray Data's order
    assert all(has_findings_and_impression(r["report"]) for r in agreed_rows)


def test_evaluate_scores_drafts_and_logs_them(trained, tiny_data, tmp_path):
    workdir, facts = trained
    out = tmp_path / "ev.json"
    assert main(["evaluate", "--model", str(workdir), "--data", str(tiny_data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rg = result["report_generation"]
    assert result["kind"] == "report" and rg["n"] > 0 and rg["findings_and_impression_rate"] == 1.0
    assert 0.0 <= rg["bleu4"] <= 1.0 and 0.0 <= rg["rouge_l"] <= 1.0 and rg["phi_suspect_drafts"] == 0
    ce = rg["clinical_efficacy"]
    assert {"f1_micro_14", "f1_macro_14", "f1_micro_5", "f1_macro_5"} <= set(ce)
    assert (tmp_path / "ev_drafts.csv").is_file()
    client = mlflow.MlflowClient(facts["tracking_uri"])
    run = client.get_run(facts["mlflow_run_id"])
    assert "test/report/rouge_l" in run.data.metrics and "test/report/f1_micro_14" in run.data.metrics
    assert run.data.metrics["test/report/drafts_ending_mid_sentence"] == rg["drafts_ending_mid_sentence"] <= rg["n"]
    artifacts = {a.path for a in client.list_artifacts(facts["mlflow_run_id"], "evaluation")}
    assert {"evaluation/report_f1_per_finding.png", "evaluation/report_samples.json",
            "evaluation/test_drafts.csv"} <= artifacts


def test_the_registered_report_model_serves_drafts_as_a_pyfunc(trained, tiny_corpus):
    _, facts = trained
    mlflow.set_tracking_uri(facts["tracking_uri"])
    model = mlflow.pyfunc.load_model(facts["model_uri"])
    dicom = next(tiny_corpus.rglob("*.dcm")).read_bytes()
    out = model.predict(pd.DataFrame({"dicom": [dicom, b"not a dicom"], "context": ["Fever.", ""]}))
    assert list(out.columns) == ["report", "error"] and has_findings_and_impression(out["report"][0])
    assert out["error"][0] == "" and out["error"][1] and out["report"][1] == ""
