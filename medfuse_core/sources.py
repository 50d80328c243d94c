"""Input formats: turn a data root into a list of per-image records to ingest.

A record is a small dict (no pixels): ``record_id, study_id, patient_id, split, image_path,
report_path | report, labels, view_hint``. Records that are broken before any decoding
(listed but missing on disk, on disk but not listed) come back separately as quarantine rows,
so every input image is accounted for.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from medfuse_core.labels import CHEXPERT_LABELS

SPLITS = ("train", "validate", "test")
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


class BadLabel(ValueError):
    """A label cell that is not 1 / 0 / -1 / blank (the value is never put in the message)."""


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


def _labels_row(row: pd.Series | dict | None) -> list[float]:
    if row is None:
        return [math.nan] * len(CHEXPERT_LABELS)
    out = []
    for name in CHEXPERT_LABELS:
        value = pd.to_numeric(row.get(name, np.nan), errors="coerce")
        blank = _text(row.get(name)) is None
        if pd.isna(value) and not blank:
            raise BadLabel(name)
        if pd.notna(value) and float(value) not in LABEL_VALUES:
            raise BadLabel(name)
        out.append(float(value) if pd.notna(value) else math.nan)
    return out


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise SourceError(f"{path.name}: missing from the data root")
    df = pd.read_csv(path, dtype=str)
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise SourceError(f"{path.name}: missing required columns {missing}")
    return df


def mimic_cxr_records(root: str | Path) -> tuple[list[dict], list[dict]]:
    """Records for the MIMIC-CXR layout (files/pNN/pSUBJECT/sSTUDY/*.dcm + the three CSVs)."""
    root = Path(root)
    if not root.is_dir():
        raise SourceError("data root: not a readable directory")
    split = _read_csv(root / "mimic-cxr-2.0.0-split.csv", ("dicom_id", "study_id", "subject_id", "split"))
    chexpert_path = root / "mimic-cxr-2.0.0-chexpert.csv"
    labels = _read_csv(chexpert_path, ("subject_id", "study_id")) if chexpert_path.exists() else None
    meta_path = root / "mimic-cxr-2.0.0-metadata.csv"
    meta = _read_csv(meta_path, ("dicom_id",)) if meta_path.exists() else None
    if split.empty:
        raise SourceError("mimic-cxr-2.0.0-split.csv: no rows")
    label_rows = {}
    if labels is not None:
        for _, row in labels.iterrows():
            label_rows[str(row["study_id"])] = pd.to_numeric(row[list(c for c in CHEXPERT_LABELS if c in row)], errors="coerce")
    views = {}
    if meta is not None and "ViewPosition" in meta.columns:
        views = dict(zip(meta["dicom_id"], meta["ViewPosition"].fillna("")))

    on_disk = ({p.stem: p for p in (root / "files").rglob("*") if p.suffix.lower() == ".dcm" and p.is_file()}
               if (root / "files").is_dir() else {})
    records, quarantined = [], []
    listed = set()
    for i, row in enumerate(split.itertuples(index=False)):
        dicom_id, study, subject = str(row.dicom_id), str(row.study_id), str(row.subject_id)
        if dicom_id in listed:
            quarantined.append({"record_id": f"{dicom_id}#{i}", "reason": "duplicate_record_id"})
            continue
        listed.add(dicom_id)
        sub = f"p{subject[:2]}/p{subject}"
        image = root / "files" / sub / f"s{study}" / f"{dicom_id}.dcm"
        if row.split not in SPLITS:
            quarantined.append({"record_id": dicom_id, "reason": "bad_split_value"})
            continue
        if not image.is_file():
            quarantined.append({"record_id": dicom_id, "reason": "missing_file"})
            continue
        try:
            labels_row = _labels_row(label_rows.get(study))
        except BadLabel:
            quarantined.append({"record_id": dicom_id, "reason": "bad_label_value"})
            continue
        records.append({
            "record_id": dicom_id,
            "study_id": study,
            "patient_id": subject,
            "split": row.split,
            "image_path": str(image),
            "report_path": str(root / "files" / sub / f"s{study}.txt"),
            "report": "",
            "labels": labels_row,
            "view_hint": safe_code(views.get(dicom_id)),
        })
    for dicom_id in sorted(set(on_disk) - listed):
        quarantined.append({"record_id": dicom_id, "reason": "not_in_split_index"})
    return records, quarantined


def manifest_records(path: str | Path, record_id_map: Callable[[str], str] | None = None
                     ) -> tuple[list[dict], list[dict]]:
    """Records for a generic manifest table (.csv or .parquet).

    Required columns: study_id, patient_id, image_path, report. Optional: record_id, split,
    any CheXpert label names, view. Relative image paths are resolved against the manifest's
    folder. Row ids default to ``row0000012`` (the row number); ids from a ``record_id``
    column go through ``record_id_map`` (ingest passes the keyed pseudonymizer: user ids are
    often accession numbers or instance UIDs).
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
        try:
            labels = _labels_row(row)
        except BadLabel:
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
            "labels": labels,
            "view_hint": safe_code(row.get("view")),
        })
    return records, quarantined


FORMATS = {"mimic-cxr": mimic_cxr_records, "manifest": manifest_records}


def patients_in_several_splits(records: list[dict]) -> list[str]:
    """Patient ids that appear in more than one split (should be none)."""
    seen: dict[str, set] = {}
    for rec in records:
        seen.setdefault(rec["patient_id"], set()).add(rec["split"])
    return sorted(p for p, s in seen.items() if len(s) > 1)
