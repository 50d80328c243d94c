"""Per-record ingest: one source record in, one shard row out, always.

Every record ends with ``status`` "ok", "quarantined" (with a reason code) or "filtered"
(dropped by a stated policy, e.g. a lateral view when only frontal views are wanted). No
exception escapes :func:`process_record`; reason codes never carry header values or text.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from medfuse_core.config import IngestConfig
from medfuse_core.dicom import DicomDecodeError, decode_dicom
from medfuse_core.reports import clinical_context

ROW_FIELDS = ("record_id", "study_id", "patient_id", "split", "view", "modality", "image", "image_size",
              "image_sha1", "context", "report", "labels", "status", "reason")

FRONTAL_VIEWS = ("PA", "AP")


def pixels_to_bytes(pixels: np.ndarray) -> bytes:
    """Store a [0,1] float image compactly (float16, C order)."""
    return np.ascontiguousarray(pixels, dtype=np.float16).tobytes()


def bytes_to_pixels(blob: bytes, size: int) -> np.ndarray:
    """Inverse of :func:`pixels_to_bytes` as float32 [size, size]."""
    return np.frombuffer(blob, dtype=np.float16).reshape(size, size).astype(np.float32)


def _empty_row(rec: dict, status: str, reason: str) -> dict:
    return {
        "record_id": rec["record_id"], "study_id": rec.get("study_id", ""), "patient_id": rec.get("patient_id", ""),
        "split": rec.get("split", ""), "view": "", "modality": "", "image": b"", "image_size": 0,
        "image_sha1": "", "context": "", "report": "", "labels": list(rec.get("labels") or []),
        "status": status, "reason": reason,
    }


def _read_report(rec: dict) -> str | None:
    """The report text: read from ``report_path`` when set, else the inline ``report``; None if unreadable."""
    path = rec.get("report_path")
    if not isinstance(path, str) or not path:
        report = rec.get("report")
        return report if isinstance(report, str) else ""
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None


def process_record(rec: dict, cfg: IngestConfig) -> dict:
    """Decode, filter and pair one record with its report; never raises."""
    try:
        return _process(rec, cfg)
    except Exception:  # last line of defence: account for the record, reveal nothing
        return _empty_row(rec, "quarantined", "internal_error")


def _process(rec: dict, cfg: IngestConfig) -> dict:
    try:
        decoded = decode_dicom(rec["image_path"], size=cfg.image_size, apply_voi=cfg.apply_voi)
    except DicomDecodeError as err:
        return _empty_row(rec, "quarantined", err.reason)
    view = (decoded.view_position or rec.get("view_hint") or "").upper()
    if cfg.views and view not in {v.upper() for v in cfg.views}:
        row = _empty_row(rec, "filtered", "view_not_selected")
        row["view"] = view
        return row
    report = _read_report(rec)
    if report is None:
        return _empty_row(rec, "quarantined", "missing_report")
    image = pixels_to_bytes(decoded.pixels)
    return {
        "record_id": rec["record_id"], "study_id": rec["study_id"], "patient_id": rec["patient_id"],
        "split": rec["split"], "view": view, "modality": decoded.modality or "",
        "image": image, "image_size": cfg.image_size, "image_sha1": hashlib.sha1(image).hexdigest(),
        "context": clinical_context(report), "report": report, "labels": list(rec["labels"]),
        "status": "ok", "reason": "",
    }
