"""Input formats: turn a data root into a list of per-image records to ingest.

A record is a small dict (no pixels): ``record_id, study_id, patient_id, split, image_path,
report_path | report, labels, labelled, view_hint``. ``labels`` holds the 14 CheXpert values
(1/0/-1, NaN for blank); ``labelled`` is False for a record without any label (a study with no
row in the label table, a manifest without label columns): its blanks are unknown, not negatives.
Records that are broken before any decoding (listed but missing on disk, on disk but not listed,
a label cell outside 1/0/-1/blank) come back separately as quarantine rows, so every input
image is accounted for. Messages never carry cell values or ids.
"""

from __future__ import annotations

import hashlib
import math
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from medfuse_core.data.labels import CHEXPERT_LABELS

SPLITS = ("train", "validate", "test")
# MIMIC-CXR tables, by stem: read as released (``.csv.gz``) or unpacked (``.csv``).
SPLIT_TABLE = "mimic-cxr-2.0.0-split"
CHEXPERT_TABLE = "mimic-cxr-2.0.0-chexpert"
METADATA_TABLE = "mimic-cxr-2.0.0-metadata"
TABLE_SUFFIXES = (".csv.gz", ".csv")
MANIFEST_REQUIRED = ("study_id", "patient_id", "image_path", "report")


class SourceError(ValueError):
    """The data root or manifest is unusable as a whole (missing, empty, wrong columns)."""


def patient_split(patient_id: str, fractions=(0.8, 0.1, 0.1)) -> str:
    """Deterministic patient-level split from a hash of the patient id."""
    h = int(hashlib.sha256(str(patient_id).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    if h < fractions[0]:
        return "train"
    if h < fractions[0] + fractions[1]:
        return "validate"
    return "test"


LABEL_VALUES = (1.0, 0.0, -1.0)


def _text(value) -> str | None:
    """A non-blank string cell, or None for blank / NaN / missing."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def safe_code(value) -> str:
    """A DICOM-style code (PA, LATERAL, DX, ...) safe to keep: short, letters/digits only; else ""."""
    text = (_text(value) or "").upper()
    return text if text.replace(" ", "").replace("_", "").isalnum() and len(text) <= 16 else ""


def _label_matrix(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All label cells of ``df`` at once: (values [n, 14], NaN = blank; bad [n]; any_label [n]).

    ``bad`` marks rows with a cell that is not 1 / 0 / -1 / blank; a label column missing
    from ``df`` counts as blank.
    """
    values = np.full((len(df), len(CHEXPERT_LABELS)), np.nan)
    bad = np.zeros(len(df), dtype=bool)
    for j, name in enumerate(CHEXPERT_LABELS):
        if name not in df.columns:
            continue
        text = df[name].astype("string").str.strip()
        blank = (text.isna() | text.eq("")).to_numpy(dtype=bool, na_value=True)
        num = pd.to_numeric(text.mask(blank), errors="coerce").to_numpy(dtype="float64", na_value=np.nan)
        bad |= ~blank & ~np.isin(num, LABEL_VALUES)
        values[:, j] = np.where(blank, np.nan, num)
    return values, bad, ~np.isnan(values).all(axis=1)


def table_path(root: str | Path, stem: str) -> Path | None:
    """The table ``stem`` in ``root``: ``stem.csv.gz`` or ``stem.csv``; None if neither.

    Both present is a :class:`SourceError` (which one is current cannot be told).
    """
    found = [p for p in (Path(root) / f"{stem}{suffix}" for suffix in TABLE_SUFFIXES) if p.is_file()]
    if len(found) > 1:
        raise SourceError(f"{stem}.csv and {stem}.csv.gz: both in the data root; keep only one")
    return found[0] if found else None


def _read_table(root: Path, stem: str, required: tuple[str, ...], needed_for: str | None = None
                ) -> pd.DataFrame | None:
    """Read table ``stem`` as strings ("" = blank). Missing: None, or a SourceError if ``needed_for``."""
    path = table_path(root, stem)
    if path is None:
        if needed_for is None:
            return None
        raise SourceError(f"{stem}.csv(.gz): missing from the data root; {needed_for}")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        df = pd.DataFrame(columns=list(required))
    except (OSError, EOFError, UnicodeDecodeError, ValueError, zlib.error) as err:
        raise SourceError(f"{path.name}: unreadable ({type(err).__name__})") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SourceError(f"{path.name}: missing required columns {missing}")
    if df.empty and needed_for is not None:
        raise SourceError(f"{path.name}: no rows; {needed_for}")
    return df


def _dicom_files(top: Path) -> set[str]:
    """Paths of the ``*.dcm`` files under ``top``, from one scandir pass (no extra stat per file)."""
    found: set[str] = set()
    stack = [str(top)]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.name.lower().endswith(".dcm") and entry.is_file():
                        found.add(entry.path)
        except OSError:
            continue
    return found


def mimic_cxr_records(root: str | Path) -> tuple[list[dict], list[dict]]:
    """Records for the MIMIC-CXR layout: ``files/pNN/pSUBJECT/sSTUDY/*.dcm`` plus the split and
    CheXpert tables (required) and the metadata table (optional), each ``.csv.gz`` or ``.csv``.

    A study without a CheXpert row, or with an all-blank one, gives records with ``labelled`` False.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError("data root: not a readable directory")
    split = _read_table(root, SPLIT_TABLE, ("dicom_id", "study_id", "subject_id", "split"),
                        needed_for="the mimic-cxr format needs the split table")
    chexpert = _read_table(root, CHEXPERT_TABLE, ("subject_id", "study_id", *CHEXPERT_LABELS),
                           needed_for="the mimic-cxr format needs the CheXpert label table")
    meta = _read_table(root, METADATA_TABLE, ("dicom_id",))
    chexpert = chexpert.drop_duplicates("study_id", keep="last")
    label_values, label_bad, label_any = _label_matrix(chexpert)
    label_at = pd.Index(chexpert["study_id"]).get_indexer(split["study_id"])  # -1: no label row
    views = {}
    if meta is not None and "ViewPosition" in meta.columns:
        views = dict(zip(meta["dicom_id"], meta["ViewPosition"]))

    files = root / "files"
    on_disk = _dicom_files(files) if files.is_dir() else set()
    unlabelled = [math.nan] * len(CHEXPERT_LABELS)
    records, quarantined = [], []
    listed = set()
    columns = zip(split["dicom_id"], split["study_id"], split["subject_id"], split["split"], label_at)
    for i, (dicom_id, study, subject, split_name, at) in enumerate(columns):
        if dicom_id in listed:
            quarantined.append({"record_id": f"{dicom_id}#{i}", "reason": "duplicate_record_id"})
            continue
        listed.add(dicom_id)
        sub = f"p{subject[:2]}/p{subject}"
        image = files / sub / f"s{study}" / f"{dicom_id}.dcm"
        if split_name not in SPLITS:
            quarantined.append({"record_id": dicom_id, "reason": "bad_split_value"})
            continue
        if str(image) not in on_disk and not image.is_file():  # the stat only for a miss (symlinked dirs)
            quarantined.append({"record_id": dicom_id, "reason": "missing_file"})
            continue
        if at >= 0 and label_bad[at]:
            quarantined.append({"record_id": dicom_id, "reason": "bad_label_value"})
            continue
        records.append({
            "record_id": dicom_id,
            "study_id": study,
            "patient_id": subject,
            "split": split_name,
            "image_path": str(image),
            "report_path": str(files / sub / f"s{study}.txt"),
            "report": "",
            "labels": label_values[at].tolist() if at >= 0 else list(unlabelled),
            "labelled": bool(at >= 0 and label_any[at]),
            "view_hint": safe_code(views.get(dicom_id)),
        })
    stems = {os.path.basename(p)[:-4] for p in on_disk}
    for dicom_id in sorted(stems - listed):
        quarantined.append({"record_id": dicom_id, "reason": "not_in_split_index"})
    return records, quarantined


def manifest_records(path: str | Path, record_id_map: Callable[[str], str] | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """Records for a generic manifest table (.csv or .parquet).

    Required columns: study_id, patient_id, image_path, report. Optional: record_id, split,
    any CheXpert label names, view. A row without any label value (or a manifest without label
    columns) gives a record with ``labelled`` False; in a labelled row, a label column the
    manifest lacks is blank (a negative under ``data.blank_policy=negative``). Relative image
    paths are resolved against the manifest's folder. Row ids default to ``row0000012`` (the
    row number); ids from a ``record_id`` column go through ``record_id_map`` (ingest passes
    the keyed pseudonymizer: user ids are often accession numbers or instance UIDs).
    """
    path = Path(path)
    if not path.is_file():
        raise SourceError("manifest: file not found or not readable")
    if path.suffix == ".parquet":
        df = pd.read_parquet(path)
    elif path.suffix == ".csv":
        df = pd.read_csv(path, dtype={"study_id": str, "patient_id": str, "record_id": str, "split": str})
    else:
        raise SourceError("manifest: expected a .csv or .parquet file")
    missing = [c for c in MANIFEST_REQUIRED if c not in df.columns]
    if missing:
        raise SourceError(f"manifest: missing required columns {missing}")
    if df.empty:
        raise SourceError("manifest: no rows")
    record_id_map = record_id_map or (lambda rid: rid)
    label_values, label_bad, label_any = _label_matrix(df)
    records, quarantined = [], []
    seen: set[str] = set()
    for i, row in enumerate(df.to_dict("records")):
        given = _text(row.get("record_id"))
        record_id = record_id_map(given) if given else f"row{i:07d}"
        if record_id in seen:
            quarantined.append({"record_id": f"{record_id}#{i}", "reason": "duplicate_record_id"})
            continue
        seen.add(record_id)
        patient, study = _text(row.get("patient_id")), _text(row.get("study_id"))
        if patient is None or study is None:
            quarantined.append({"record_id": record_id,
                                "reason": "missing_patient_id" if patient is None else "missing_study_id"})
            continue
        split = _text(row.get("split")) or patient_split(patient)
        if split not in SPLITS:
            quarantined.append({"record_id": record_id, "reason": "bad_split_value"})
            continue
        image_text = _text(row.get("image_path"))
        image = Path(image_text) if image_text else None
        if image is not None and not image.is_absolute():
            image = path.parent / image
        if image is None or not image.is_file():
            quarantined.append({"record_id": record_id, "reason": "missing_file"})
            continue
        if label_bad[i]:
            quarantined.append({"record_id": record_id, "reason": "bad_label_value"})
            continue
        report = row.get("report")
        records.append({
            "record_id": record_id,
            "study_id": study,
            "patient_id": patient,
            "split": split,
            "image_path": str(image),
            "report_path": "",
            "report": report if isinstance(report, str) else "",
            "labels": label_values[i].tolist(),
            "labelled": bool(label_any[i]),
            "view_hint": safe_code(row.get("view")),
        })
    return records, quarantined


def dicom_dir_records(root: str | Path, record_id_map: Callable[[str], str] | None = None
                      ) -> tuple[list[dict], list[dict]]:
    """Records for a folder of DICOM files (``*.dcm``, any depth), e.g. for prediction: no
    reports, no labels, every image in the ``test`` split. The record id is the file's path
    under ``root`` through ``record_id_map`` (ingest passes the keyed pseudonymizer, so paths
    that hold names or accession numbers never reach an output); each file is its own study."""
    top = Path(root)
    if not top.is_dir():
        raise SourceError("--root: not a folder of DICOM files")
    files = sorted(_dicom_files(top))
    if not files:
        raise SourceError("--root: no *.dcm files under the folder")
    record_id_map = record_id_map or (lambda rid: rid)
    records = []
    for path in files:
        rel = os.path.relpath(path, top)
        rid = record_id_map(rel)
        records.append({"record_id": rid, "study_id": rid, "patient_id": rid, "split": "test",
                        "image_path": path, "report_path": "", "report": "",
                        "labels": [float("nan")] * len(CHEXPERT_LABELS), "labelled": False, "view_hint": ""})
    return records, []


FORMATS = {"mimic-cxr": mimic_cxr_records, "manifest": manifest_records, "dicom-dir": dicom_dir_records}


def patients_in_several_splits(records: list[dict]) -> list[str]:
    """Patient ids that appear in more than one split (should be none)."""
    seen: dict[str, set] = {}
    for rec in records:
        seen.setdefault(rec["patient_id"], set()).add(rec["split"])
    return sorted(p for p, s in seen.items() if len(s) > 1)
