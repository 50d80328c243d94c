"""Reading MIMIC-CXR tables as released (.csv.gz or .csv), label cells, unlabelled studies, manifests."""

from __future__ import annotations

import gzip
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medfuse_core.config import IngestConfig
from medfuse_core.data.deid import Pseudonymizer
from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.data.records import ROW_FIELDS, process_record
from medfuse_core.data.sources import (CHEXPERT_TABLE, METADATA_TABLE, SPLIT_TABLE, SourceError, manifest_records,
                                  mimic_cxr_records, table_path)
from medfuse_core.data.synth import generate_corpus

STEMS = (CHEXPERT_TABLE, SPLIT_TABLE, METADATA_TABLE)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus6")
    generate_corpus(root, n_studies=6, seed=3)
    return root


@pytest.fixture
def copy(corpus, tmp_path) -> Path:
    dst = tmp_path / "c"
    shutil.copytree(corpus, dst)
    return dst


def _read(root: Path, stem: str) -> pd.DataFrame:
    return pd.read_csv(table_path(root, stem), dtype=str, keep_default_na=False)


def _write(root: Path, stem: str, df: pd.DataFrame) -> None:
    df.to_csv(table_path(root, stem), index=False)  # pandas gzips by suffix


def _relative(records: list[dict], root: Path) -> list[dict]:
    """Records with paths relative to ``root`` and NaN as None, so two roots compare equal."""
    out = []
    for rec in records:
        rec = dict(rec)
        for key in ("image_path", "report_path"):
            rec[key] = str(Path(rec[key]).relative_to(root))
        rec["labels"] = [None if math.isnan(v) else v for v in rec["labels"]]
        out.append(rec)
    return out


def test_gzipped_and_plain_tables_read_the_same_records(corpus, copy):
    assert all(table_path(corpus, s).name == f"{s}.csv.gz" for s in STEMS)
    for stem in STEMS:  # unpack the copy's tables
        gz = copy / f"{stem}.csv.gz"
        (copy / f"{stem}.csv").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert all(table_path(copy, s).name == f"{s}.csv" for s in STEMS)
    a, qa = mimic_cxr_records(corpus)
    b, qb = mimic_cxr_records(copy)
    assert a and qa == qb == []
    assert _relative(a, corpus) == _relative(b, copy)
    assert set(a[0]) == {"record_id", "study_id", "patient_id", "split", "image_path", "report_path", "report",
                         "labels", "labelled", "view_hint"}
    assert all(r["labelled"] is True for r in a) and {r["view_hint"] for r in a} <= {"PA", "AP", "LATERAL", "LL"}
    # labels as written: "No Finding" only 1.0 or blank (NaN)
    chex = _read(corpus, CHEXPERT_TABLE).set_index("study_id")
    j = CHEXPERT_LABELS.index("No Finding")
    for rec in a:
        cell = chex.loc[rec["study_id"], "No Finding"]
        assert (rec["labels"][j] == 1.0) if cell == "1.0" else (cell == "" and math.isnan(rec["labels"][j]))


def test_both_csv_and_gz_is_an_error(copy):
    (copy / f"{SPLIT_TABLE}.csv").write_bytes(gzip.decompress((copy / f"{SPLIT_TABLE}.csv.gz").read_bytes()))
    with pytest.raises(SourceError) as err:
        mimic_cxr_records(copy)
    assert f"{SPLIT_TABLE}.csv and {SPLIT_TABLE}.csv.gz" in str(err.value)
    with pytest.raises(SourceError, match="both"):
        table_path(copy, SPLIT_TABLE)


def test_missing_or_empty_chexpert_table_is_an_error(copy):
    path = copy / f"{CHEXPERT_TABLE}.csv.gz"
    header = gzip.decompress(path.read_bytes()).decode().splitlines()[0]
    path.unlink()
    with pytest.raises(SourceError) as err:
        mimic_cxr_records(copy)
    assert "mimic-cxr-2.0.0-chexpert.csv(.gz): missing from the data root" in str(err.value)
    assert "CheXpert label table" in str(err.value)
    (copy / f"{CHEXPERT_TABLE}.csv").write_text(header + "\n")  # columns, no rows
    with pytest.raises(SourceError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv: no rows"):
        mimic_cxr_records(copy)
    (copy / f"{CHEXPERT_TABLE}.csv").write_bytes(b"")  # zero bytes
    with pytest.raises(SourceError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv: "):
        mimic_cxr_records(copy)
    (copy / f"{CHEXPERT_TABLE}.csv").unlink()
    (copy / f"{CHEXPERT_TABLE}.csv.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(SourceError, match=r"mimic-cxr-2\.0\.0-chexpert\.csv\.gz: unreadable"):
        mimic_cxr_records(copy)


def test_chexpert_table_without_a_label_column_is_an_error(copy):
    _write(copy, CHEXPERT_TABLE, _read(copy, CHEXPERT_TABLE).drop(columns=["No Finding"]))
    with pytest.raises(SourceError, match=r"missing required columns \['No Finding'\]"):
        mimic_cxr_records(copy)


def test_metadata_table_is_optional(corpus, copy):
    (copy / f"{METADATA_TABLE}.csv.gz").unlink()
    records, quarantined = mimic_cxr_records(copy)
    assert len(records) == len(mimic_cxr_records(corpus)[0]) and quarantined == []
    assert {r["view_hint"] for r in records} == {""}


def test_study_without_a_label_row_is_unlabelled_not_negative(copy):
    chex = _read(copy, CHEXPERT_TABLE)
    dropped = chex["study_id"].iloc[0]
    _write(copy, CHEXPERT_TABLE, chex.iloc[1:])
    records, quarantined = mimic_cxr_records(copy)
    assert quarantined == []
    by_study = {}
    for rec in records:
        by_study.setdefault(rec["study_id"], []).append(rec)
    assert all(r["labelled"] is False and all(math.isnan(v) for v in r["labels"]) for r in by_study[dropped])
    assert all(r["labelled"] is True for s, recs in by_study.items() if s != dropped for r in recs)

    # the flag reaches every shard row, ok or not
    cfg, ps = IngestConfig(image_size=16, views=[]), Pseudonymizer.for_synthetic_data()
    assert "labelled" in ROW_FIELDS
    unlabelled = process_record(by_study[dropped][0], cfg, ps)
    labelled = process_record(next(r for s, recs in by_study.items() if s != dropped for r in recs), cfg, ps)
    assert [r["status"] for r in unlabelled + labelled] == ["ok", "ok"]
    assert unlabelled[0]["labelled"] is False and labelled[0]["labelled"] is True
    broken = dict(by_study[dropped][0], image_path=str(copy / "nowhere.dcm"))
    row = process_record(broken, cfg, ps)[0]
    assert row["status"] == "quarantined" and row["labelled"] is False and set(row) == set(ROW_FIELDS)


def test_bad_label_cell_quarantines_the_study(copy):
    chex = _read(copy, CHEXPERT_TABLE)
    bad_study, spaced_study = chex["study_id"].iloc[0], chex["study_id"].iloc[1]
    chex.loc[0, "Edema"] = "u"
    chex.loc[1, "Edema"] = " -1 "  # numeric spellings with spaces are fine
    chex.loc[1, "Pleural Other"] = ""
    _write(copy, CHEXPERT_TABLE, chex)
    split = _read(copy, SPLIT_TABLE)
    n_bad = int((split["study_id"] == bad_study).sum())
    records, quarantined = mimic_cxr_records(copy)
    assert sorted(q["reason"] for q in quarantined) == ["bad_label_value"] * n_bad
    assert {q["record_id"] for q in quarantined} == set(split.loc[split["study_id"] == bad_study, "dicom_id"])
    assert all(set(q) == {"record_id", "reason"} for q in quarantined)
    spaced = next(r for r in records if r["study_id"] == spaced_study)
    assert spaced["labels"][CHEXPERT_LABELS.index("Edema")] == -1.0
    assert math.isnan(spaced["labels"][CHEXPERT_LABELS.index("Pleural Other")])
    for value in ("NA", "2", "0.5", "nan"):  # not 1 / 0 / -1 / blank
        chex.loc[0, "Edema"] = value
        _write(copy, CHEXPERT_TABLE, chex)
        assert len(mimic_cxr_records(copy)[1]) == n_bad, value


def test_missing_and_unindexed_files(copy):
    split = _read(copy, SPLIT_TABLE)
    records, _ = mimic_cxr_records(copy)
    gone = Path(records[0]["image_path"])
    gone.rename(gone.with_name("unlisted.dcm"))
    _, quarantined = mimic_cxr_records(copy)
    assert {(q["record_id"], q["reason"]) for q in quarantined} == {
        (gone.stem, "missing_file"), ("unlisted", "not_in_split_index")}
    assert len(split) == len(records)


def _manifest(copy: Path, tmp_path: Path, **label_columns) -> Path:
    records, _ = mimic_cxr_records(copy)
    rows = [{"study_id": r["study_id"], "patient_id": r["patient_id"], "image_path": r["image_path"], "report": ""}
            for r in records[:4]]
    df = pd.DataFrame(rows)
    for name, values in label_columns.items():
        df[name.replace("_", " ")] = values
    path = tmp_path / "manifest.csv"
    df.to_csv(path, index=False)
    return path


def test_manifest_without_label_columns_is_unlabelled(copy, tmp_path):
    records, quarantined = manifest_records(_manifest(copy, tmp_path))
    assert len(records) == 4 and quarantined == []
    assert all(r["labelled"] is False and all(math.isnan(v) for v in r["labels"]) for r in records)


def test_manifest_label_cells(copy, tmp_path):
    path = _manifest(copy, tmp_path, Cardiomegaly=["1", None, "u", "0"], No_Finding=[None, None, None, 1.0])
    records, quarantined = manifest_records(path)
    assert quarantined == [{"record_id": "row0000002", "reason": "bad_label_value"}]
    by_id = {r["record_id"]: r for r in records}
    c, nf = CHEXPERT_LABELS.index("Cardiomegaly"), CHEXPERT_LABELS.index("No Finding")
    assert by_id["row0000000"]["labels"][c] == 1.0 and by_id["row0000000"]["labelled"] is True
    assert by_id["row0000001"]["labelled"] is False  # a row with no label value at all
    assert by_id["row0000003"]["labels"][c] == 0.0 and by_id["row0000003"]["labels"][nf] == 1.0
    assert np.isnan(by_id["row0000000"]["labels"][nf])
