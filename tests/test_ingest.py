"""Ingest on a real local Ray cluster: every record accounted for, broken files quarantined."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pydicom
import pytest
from pydicom.encaps import encapsulate

from medfuse_core.config import IngestConfig
from medfuse_core.data.sources import METADATA_TABLE, SPLIT_TABLE, SourceError, table_path
from pipelines import ingest
from pipelines.cli import main


def _shard_rows(data: Path) -> pd.DataFrame:
    return pq.read_table(data / "shards").to_pandas()


def test_tiny_corpus_accounting(tiny_data):
    summary = json.loads((tiny_data / "ingest_summary.json").read_text())
    assert summary["n_records"] == summary["n_ok"] + summary["n_quarantined"] + summary["n_filtered"]
    assert summary["n_ok"] > 0 and summary["n_filtered"] > 0  # lateral views are filtered by policy
    assert set(summary["filtered_by_reason"]) == {"view_not_selected"}
    rows = _shard_rows(tiny_data)
    assert len(rows) == summary["n_ok"]
    assert set(rows["view"]) <= {"PA", "AP"}
    assert rows["record_id"].is_unique
    by_patient = rows.groupby("patient_id")["split"].nunique()
    assert (by_patient == 1).all()
    # the classifier's text is the clinical context, not the findings
    assert not rows["context"].str.contains("FINDINGS|IMPRESSION", regex=True).any()
    assert rows["context"].str.len().gt(0).mean() > 0.9
    assert (rows["image_size"] == 48).all() and rows["image"].map(len).eq(48 * 48 * 2).all()
    # de-identified: pseudonymous ids, allow-listed header with the profile recorded
    assert rows["patient_id"].str.match(r"^P-[0-9A-F]{16}$").all()
    assert rows["study_id"].str.match(r"^S-[0-9A-F]{16}$").all()
    header = json.loads(rows["header"].iloc[0])
    assert header["PatientIdentityRemoved"] == "YES" and "PatientName" not in header
    assert summary["deid"]["synthetic_key"] is True and "Annex E" in summary["deid"]["method"]


def _broken_copy(src: Path, dst: Path) -> dict:
    """A corpus copy with one truncated file, one object without pixels, one missing, one unindexed."""
    shutil.copytree(src, dst)
    split = pd.read_csv(table_path(dst, SPLIT_TABLE), dtype=str)
    meta = pd.read_csv(table_path(dst, METADATA_TABLE), dtype=str)
    frontal = meta[meta["ViewPosition"].isin(["PA", "AP"])]["dicom_id"].tolist()
    paths = {p.stem: p for p in (dst / "files").rglob("*.dcm")}
    truncated, nopixels, missing, unindexed, burned = frontal[:5]
    data = paths[truncated].read_bytes()
    paths[truncated].write_bytes(data[: len(data) // 2])
    ds = pydicom.dcmread(paths[nopixels])  # turn it into an object without an image (like an SR)
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
                    "SamplesPerPixel", "PhotometricInterpretation"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(paths[nopixels])
    paths[missing].unlink()
    ds = pydicom.dcmread(paths[burned])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(paths[burned])
    split[split["dicom_id"] != unindexed].to_csv(table_path(dst, SPLIT_TABLE), index=False)
    return {"truncated": truncated, "nopixels": nopixels, "missing": missing, "unindexed": unindexed, "burned": burned,
            "n_images": len(paths)}


def test_broken_files_are_quarantined_not_crashes(ray_local, tiny_corpus, tmp_path, capsys):
    facts = _broken_copy(tiny_corpus, tmp_path / "corpus")
    out = tmp_path / "data"
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(tmp_path / "corpus"), "--out", str(out),
                 "--image-size", "32"])
    assert code == 0
    summary = json.loads((out / "ingest_summary.json").read_text())
    assert summary["n_records"] == facts["n_images"]
    assert summary["n_records"] == summary["n_ok"] + summary["n_quarantined"] + summary["n_filtered"]
    reasons = {q["record_id"]: q["reason"] for q in summary["quarantine"]}
    assert reasons[facts["truncated"]] in {"truncated", "unreadable"}
    filtered = {f["record_id"]: f["reason"] for f in summary["filtered"]}
    assert filtered[facts["nopixels"]] == "non_image_object"  # not an image, not corrupt
    assert reasons[facts["missing"]] == "missing_file"
    assert reasons[facts["unindexed"]] == "not_in_split_index"
    assert reasons[facts["burned"]] == "burned_in_annotation"
    for row in summary["quarantine"]:
        assert set(row) == {"record_id", "reason"}
    assert len(_shard_rows(out)) == summary["n_ok"]


def test_manifest_format(ray_local, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "5e" * 32)
    split = pd.read_csv(table_path(tiny_corpus, SPLIT_TABLE), dtype=str).head(12)
    rows = []
    for r in split.itertuples():
        study_dir = tiny_corpus / "files" / f"p{r.subject_id[:2]}" / f"p{r.subject_id}"
        rows.append({"record_id": r.dicom_id, "study_id": r.study_id, "patient_id": r.subject_id,
                     "image_path": str(study_dir / f"s{r.study_id}" / f"{r.dicom_id}.dcm"),
                     "report": (study_dir / f"s{r.study_id}.txt").read_text(), "Cardiomegaly": 1.0})
    manifest = tmp_path / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    summary = ingest.run("manifest", manifest, tmp_path / "data", IngestConfig(image_size=32, views=[]))
    assert summary["n_records"] == 12 and summary["n_ok"] == 12
    shards = _shard_rows(tmp_path / "data")
    assert set(shards["split"]) <= {"train", "validate", "test"}
    assert (shards.groupby("patient_id")["split"].nunique() == 1).all()
    assert shards["patient_id"].str.startswith("P-").all()  # keyed pseudonyms, not the source ids
    assert not set(shards["patient_id"]) & set(split["subject_id"])
    assert not set(shards["record_id"]) & set(split["dicom_id"])  # user ids pseudonymised too


def test_manifest_cells_are_checked_not_trusted(ray_local, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "5e" * 32)
    split = pd.read_csv(table_path(tiny_corpus, SPLIT_TABLE), dtype=str).head(4)
    paths = {p.stem: str(p) for p in (tiny_corpus / "files").rglob("*.dcm")}
    rows = [{"record_id": None, "study_id": r.study_id, "patient_id": r.subject_id,
             "image_path": paths[r.dicom_id], "report": "", "Cardiomegaly": "1"} for r in split.itertuples()]
    rows[1]["record_id"] = None  # blank ids fall back to distinct row numbers, not one "nan"
    rows[2]["Cardiomegaly"] = "u"  # not a label value
    rows[3]["patient_id"] = None
    manifest = tmp_path / "m.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    summary = ingest.run("manifest", manifest, tmp_path / "d", IngestConfig(image_size=32, views=[]))
    assert summary["n_records"] == 4
    assert summary["quarantine_by_reason"] == {"bad_label_value": 1, "missing_patient_id": 1}
    assert summary["n_ok"] == 2


def test_real_archive_without_a_key_is_refused(ray_local, tiny_corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MEDFUSE_DEID_KEY", raising=False)
    corpus = tmp_path / "archive"
    shutil.copytree(tiny_corpus, corpus)
    (corpus / "medfuse-synthetic.json").unlink()  # no longer marked synthetic
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(corpus), "--out", str(tmp_path / "d")])
    assert code == 2
    assert "MEDFUSE_DEID_KEY" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_leaking_split_is_refused(ray_local, tiny_corpus, tmp_path, capsys):
    corpus = tmp_path / "leaky"
    shutil.copytree(tiny_corpus, corpus)
    split = pd.read_csv(table_path(corpus, SPLIT_TABLE), dtype=str)
    patient = split["subject_id"].iloc[0]
    rows = split.index[split["subject_id"] == patient]
    split.loc[rows[0], "split"] = "train"
    split.loc[rows[-1], "split"] = "test"
    if len(rows) == 1:  # give the patient a second image in another split
        extra = split.loc[[rows[0]]].assign(split="test")
        split = pd.concat([split, extra])
    split.to_csv(table_path(corpus, SPLIT_TABLE), index=False)
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(corpus), "--out", str(tmp_path / "d")])
    assert code == 2
    assert "more than one split" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_bad_manifests_fail_clearly(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "5e" * 32)
    empty = tmp_path / "empty.csv"
    pd.DataFrame(columns=["study_id", "patient_id", "image_path", "report"]).to_csv(empty, index=False)
    with pytest.raises(SourceError, match="no rows"):
        ingest.run("manifest", empty, tmp_path / "a")
    cols = tmp_path / "cols.csv"
    pd.DataFrame([{"study_id": 1, "image_path": "x.dcm"}]).to_csv(cols, index=False)
    code = main(["ingest", "--format", "manifest", "--root", str(cols), "--out", str(tmp_path / "b")])
    assert code == 2
    assert "missing required columns" in capsys.readouterr().err
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "c")])
    assert code == 2
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_missing_decoder_stops_the_job(ray_local, tiny_corpus, tmp_path, capsys):
    corpus = tmp_path / "mpeg"
    shutil.copytree(tiny_corpus, corpus)
    for path in sorted((corpus / "files").rglob("*.dcm"))[:3]:
        ds = pydicom.dcmread(path)
        if not ds.file_meta.TransferSyntaxUID.is_encapsulated:
            ds.PixelData = encapsulate([bytes(ds.PixelData)])
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder installed
        ds.save_as(path, enforce_file_format=True)
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(corpus), "--out", str(tmp_path / "d"),
                 "--views", ""])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "1.2.840.10008.1.2.4.100" in err and "decoder" in err
    assert not (tmp_path / "d").exists()


def test_wholesale_quarantine_of_a_group_stops_the_job(ray_local, tiny_corpus, tmp_path, capsys):
    corpus = tmp_path / "cut"
    shutil.copytree(tiny_corpus, corpus)
    paths = sorted((corpus / "files").rglob("*.dcm"))
    for path in paths[: int(len(paths) * 0.4)]:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(corpus), "--out", str(tmp_path / "d"),
                 "--views", "", "max_quarantine_rate=0.25"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "max_quarantine_rate" in err
    assert not (tmp_path / "d").exists()


def test_layout_outcomes_and_context_accounting(tiny_data):
    """Shards are partitioned by split; the outcome table accounts for every record; context
    statuses are counted; the training columns can be read for one split alone."""
    from pipelines.shards import OUTCOMES_DIR, SPLITS, split_dir

    summary = json.loads((tiny_data / "ingest_summary.json").read_text())
    for split in SPLITS:
        files = list(split_dir(tiny_data, split).glob("*.parquet"))
        assert files, split
        table = pq.read_table(files[0])
        assert "split" not in table.column_names  # the folder names it
    rows = _shard_rows(tiny_data)
    assert rows.groupby("split", observed=True).size().to_dict() == summary["splits"]
    outcomes = pq.read_table(tiny_data / OUTCOMES_DIR).to_pandas()
    assert "image" not in outcomes.columns and "report" not in outcomes.columns and "context" not in outcomes
    assert outcomes["record_id"].nunique() == summary["n_records"] - len(
        [q for q in summary["quarantine"] if q["reason"] in ("missing_file", "not_in_split_index")])
    assert (outcomes["status"] == "ok").sum() == summary["n_ok"]
    assert sum(summary["context"].values()) == summary["n_ok"]
    assert set(summary["context"]) <= {"ok", "none", "dropped_long", "dropped_findings"}
    assert summary["labelled_images_per_split"]["train"] <= summary["splits"]["train"]


def test_ingest_leaves_nothing_when_stopped(ray_local, tiny_corpus, tmp_path, capsys):
    """A health stop after the streaming write leaves no output folder and no staging folder."""
    out = tmp_path / "data"
    code = main(["ingest", "--format", "mimic-cxr", "--root", str(tiny_corpus), "--out", str(out),
                 "--image-size", "32", "max_quarantine_rate=0.0", "min_group_for_rate=1", "max_file_bytes=2000"])
    assert code == 3
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == []
