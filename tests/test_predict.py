"""``medfuse predict`` on a real local Ray cluster: the ingest path in front (a broken file is
quarantined with its reason and gets no prediction row), calibrated probabilities and
validation operating points from the bundle, every input format, CSV and Parquet out."""

from __future__ import annotations

import csv
import gzip
import shutil

import numpy as np
import pandas as pd
import pytest

from medfuse_core.data.labels import CHEXPERT_LABELS
from pipelines.cli import main
from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    """A real diagnosis bundle (random weights) with fitted-looking temperatures and thresholds."""
    import torch

    from medfuse_core.experiment import load_config
    from medfuse_core.models import build_model, save_bundle

    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CHEXPERT_LABELS), cfg.data.image_size, load_vision_weights=False).eval()
    n = len(CHEXPERT_LABELS)
    extra = {"calibration": {"method": "temperature", "fitted_on": "validate", "n": 10,
                             "temperatures": {"image_only": [2.0] * n, "image_text": [0.5] * n}},
             "thresholds": {"image_only": [0.5] * n, "image_text": [0.4] * n}}
    return save_bundle(model, cfg.model, list(CHEXPERT_LABELS), cfg.data.image_size,
                       tmp_path_factory.mktemp("bundle") / "model", extra=extra)


def _read(path):
    return pd.read_parquet(path) if str(path).endswith(".parquet") else pd.read_csv(path, dtype={"record_id": str})


def test_predict_a_mimic_cxr_root_matches_the_model_in_process(ray_local, bundle_dir, tiny_corpus, tiny_data, tmp_path):
    from medfuse_core.data.batching import blobs_to_images
    from medfuse_core.models.bundle import load_bundle
    from medfuse_core.evaluation.inference import predict_frame
    from pipelines.shards import read_split_table

    out = tmp_path / "preds.csv"
    assert main(["predict", "--model", str(bundle_dir), "--input", str(tiny_corpus), "--out", str(out)]) == 0
    preds = _read(out)
    assert list(preds.columns[:2]) == ["record_id", "context_used"]
    assert [c for c in preds.columns if c.startswith("prob:")] == [f"prob:{n}" for n in CHEXPERT_LABELS]
    assert [c for c in preds.columns if c.startswith("pred:")] == [f"pred:{n}" for n in CHEXPERT_LABELS]
    # the same images ingest keeps (its tiny_data twin was ingested at the same size)
    table = pd.concat([read_split_table(tiny_data, s, ["image_id", "image", "image_size", "context"]).to_pandas()
                       for s in ("train", "validate", "test")])
    assert sorted(preds["record_id"]) == sorted(table["image_id"])
    split = pd.read_csv(tiny_corpus / "mimic-cxr-2.0.0-split.csv.gz", dtype=str)
    assert set(preds["record_id"]) <= set(split["dicom_id"])  # the dicom_id, as MIMIC-CXR names images
    bundle = load_bundle(bundle_dir)
    sample = table.head(12)
    direct = predict_frame(bundle, blobs_to_images(list(sample["image"]), list(sample["image_size"])),
                           list(sample["context"].fillna("")))
    got = preds.set_index("record_id").loc[list(sample["image_id"])]
    assert np.allclose(got[[f"prob:{n}" for n in CHEXPERT_LABELS]].to_numpy(), direct["prob"], atol=1e-5)
    assert np.array_equal(got["context_used"].to_numpy(), direct["context_used"].astype(int))
    assert preds["context_used"].any()  # studies with an indication are scored with it
    # the operating points: pred = prob >= threshold of the row's mode
    probs = preds[[f"prob:{n}" for n in CHEXPERT_LABELS]].to_numpy()
    cut = np.where(preds["context_used"].to_numpy()[:, None] == 1, 0.4, 0.5)
    assert np.array_equal(preds[[f"pred:{n}" for n in CHEXPERT_LABELS]].to_numpy(), (probs >= cut).astype(int))


def test_predict_a_dicom_folder_quarantines_the_bad_file_and_writes_parquet(ray_local, bundle_dir, tiny_corpus,
                                                                            tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "5a" * 32)  # a real archive's key (not the synthetic one)
    folder = tmp_path / "incoming"
    folder.mkdir()
    for i, path in enumerate(sorted(tiny_corpus.rglob("*.dcm"))[:6]):
        shutil.copy(path, folder / f"img{i}.dcm")
    (folder / "broken.dcm").write_bytes(b"DICM" + b"\x00" * 64)
    out = tmp_path / "preds.parquet"
    assert main(["predict", "--model", str(bundle_dir), "--input", str(folder), "--out", str(out),
                 "views=[]"]) == 0
    summary = capsys.readouterr().out
    preds = _read(out)
    with open(tmp_path / "preds.parquet.quarantine.csv", newline="") as fh:
        bad = list(csv.DictReader(fh))
    assert len(preds) == 6 and len(bad) == 1 and bad[0]["status"] == "quarantined" and bad[0]["reason"]
    assert bad[0]["record_id"] not in set(preds["record_id"])
    assert all("img" not in r and "broken" not in r for r in list(preds["record_id"]) + [bad[0]["record_id"]])
    assert not preds["context_used"].any()  # a DICOM folder has no reports, so image-only
    assert '"n_quarantined": 1' in summary and str(tmp_path) not in bad[0]["record_id"]


def test_predict_refuses_a_bad_output_name_before_any_work(bundle_dir, tiny_corpus, tmp_path, capsys):
    assert main(["predict", "--model", str(bundle_dir), "--input", str(tiny_corpus),
                 "--out", str(tmp_path / "preds.json")]) == 2
    assert "--out" in capsys.readouterr().err and not list(tmp_path.iterdir())


@pytest.mark.heavy  # starts a real `mlflow models serve` process (about a minute): `python -m pytest -m heavy`
def test_mlflow_models_serve_answers_an_http_client_like_medfuse_predict(ray_local, bundle_dir, tiny_corpus, tmp_path,
                                                                       monkeypatch):
    import base64
    import json
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow

    from pipelines import tracking

    monkeypatch.setenv("MEDFUSE_DEID_KEY", "5a" * 32)
    folder = tmp_path / "one"
    folder.mkdir()
    dicom = sorted(tiny_corpus.rglob("*.dcm"))[0]
    shutil.copy(dicom, folder / "x.dcm")
    assert main(["predict", "--model", str(bundle_dir), "--input", str(folder), "--out", str(tmp_path / "p.csv"),
                 "views=[]"]) == 0
    expected = _read(tmp_path / "p.csv")

    uri = tracking.tracking_uri(tmp_path)
    tracking.setup(tmp_path, "serve-test")
    with mlflow.start_run():
        tracking.log_model(bundle_dir, "medfuse-serve-test")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m",
                               "models:/medfuse-serve-test@candidate", "--env-manager", "local", "-h", "127.0.0.1",
                               "-p", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.time() + 240
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the model server did not come up"
                time.sleep(1)
        body = {"dataframe_split": {"columns": ["dicom", "context"],
                                    "data": [[base64.b64encode(dicom.read_bytes()).decode(), ""],
                                             [base64.b64encode(b"not a dicom").decode(), ""]]}}
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())["predictions"]
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
    assert len(answer) == 2 and answer[0]["error"] == "" and answer[1]["error"]
    for name in CHEXPERT_LABELS:
        assert abs(answer[0][f"prob:{name}"] - expected[f"prob:{name}"][0]) < 1e-5
        assert answer[0][f"pred:{name}"] == expected[f"pred:{name}"][0]
