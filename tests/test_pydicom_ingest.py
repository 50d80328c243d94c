"""Every DICOM file pydicom ships goes through the real ingest path (a manifest pointing at them).

Each file ends decoded ("ok"), quarantined with a typed reason, or filtered as a non-image
object; nothing crashes and every file is accounted for.
"""

from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq

from medfuse_core.config import IngestConfig
from medfuse_core.data.deid import Pseudonymizer, load_key
from medfuse_core.data.dicom import REASON_CODES
from pipelines import ingest
from tests import dicom_fuzz_harness as harness


def test_pydicom_corpus_through_manifest_ingest(ray_local, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "7a" * 32)
    files = harness.bundled_files()
    manifest = pd.DataFrame({
        "record_id": [f"pydicom-{i:04d}" for i in range(len(files))],
        "study_id": [f"study-{i:04d}" for i in range(len(files))],
        "patient_id": [f"patient-{i:04d}" for i in range(len(files))],
        "image_path": [str(p) for p in files],
        "report": "",
        "split": "train",
    })
    path = tmp_path / "manifest.parquet"
    manifest.to_parquet(path)
    # pydicom's test files are broken on purpose: rate limits off, every other policy as shipped
    cfg = IngestConfig(image_size=32, views=[], max_quarantine_rate=1.0)
    summary = ingest.run("manifest", path, tmp_path / "data", cfg)

    assert summary["n_records"] == len(files)
    assert summary["n_records"] == summary["n_ok"] + summary["n_quarantined"] + summary["n_filtered"]
    outcomes = [q["record_id"] for q in summary["quarantine"]] + [f["record_id"] for f in summary["filtered"]]
    shards = pq.read_table(tmp_path / "data" / "shards").to_pandas()
    outcomes += sorted(set(shards["record_id"]))
    ps = Pseudonymizer(load_key())  # user-supplied record ids are stored as keyed pseudonyms
    expected = sorted(ps.pseudonym("record", rid) for rid in manifest["record_id"])
    assert sorted(outcomes) == expected, "each file has exactly one outcome"
    assert "internal_error" not in summary["quarantine_by_reason"]
    allowed = set(REASON_CODES) | {"burned_in_annotation", "missing_file"}
    assert set(summary["quarantine_by_reason"]) <= allowed
    assert set(summary["filtered_by_reason"]) == {"non_image_object"}
    assert summary["filtered_by_reason"]["non_image_object"] >= 70  # SRs, RT plans, DICOMDIRs, ...
    assert summary["n_ok"] >= 95
    with capsys.disabled():
        print("\npydicom corpus through ingest: " + json.dumps(
            {k: summary[k] for k in ("n_records", "n_ok", "n_quarantined", "n_filtered", "n_images",
                                     "quarantine_by_reason", "filtered_by_reason")}))
