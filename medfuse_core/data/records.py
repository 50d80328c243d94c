"""Per-record ingest: one source record in, shard rows out, always accounted for.

Each record ends with ``status`` "ok" (one row per frame selected by ``frames``; one bad
frame quarantines the whole record), "quarantined" (a reason
code) or "filtered" (dropped by a stated policy: a view not selected, a non-image object).
No exception escapes :func:`process_record`; reason codes never carry header values or text.

Everything that reaches a row is de-identified first (:mod:`medfuse_core.data.deid`): patient and
study ids become keyed pseudonyms, the header is reduced to an allow-list, and the report is
scrubbed before the clinical context is cut from it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from medfuse_core.config import IngestConfig
from medfuse_core.data.deid import Pseudonymizer, deidentify, has_burned_in_annotation, pseudonymize_record_ids
from medfuse_core.data.dicom import DicomDecodeError, decode_dicom, frame_indices, read_dataset
from medfuse_core.data.reports import clinical_context_checked
from medfuse_core.data.sources import safe_code

ROW_FIELDS = ("record_id", "image_id", "frame", "study_id", "patient_id", "split", "view", "modality",
              "transfer_syntax", "image", "image_size", "image_sha1", "context", "context_status", "report", "labels",
              "labelled", "header", "deid_audit", "status", "reason")

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def pixels_to_bytes(pixels: np.ndarray) -> bytes:
    """Store a [0,1] float image compactly (float16, C order); ``batching.blobs_to_images`` reads it."""
    return np.ascontiguousarray(pixels, dtype=np.float16).tobytes()


def as_stored(pixels: np.ndarray) -> np.ndarray:
    """A decoded image at the precision the shards store (float16, read back as float32): what a
    model scoring one file directly (serving, ``medfuse report``, ``medfuse sr``) must see to agree
    with ``medfuse predict`` and with training."""
    return np.asarray(pixels, dtype=np.float16).astype(np.float32)


def _ids(rec: dict, ps: Pseudonymizer) -> dict:
    ids = pseudonymize_record_ids(rec, ps)
    return {"study_id": ids["study_id"], "patient_id": ids["patient_id"]}


def _row(rec: dict, ps: Pseudonymizer, status: str, reason: str, **facts) -> dict:
    row = {
        "record_id": rec["record_id"], "image_id": rec["record_id"], "frame": 0, **_ids(rec, ps),
        "split": rec.get("split", ""), "view": "", "modality": "", "transfer_syntax": "", "image": b"",
        "image_size": 0, "image_sha1": "", "context": "", "context_status": "", "report": "",
        "labels": list(rec.get("labels") or []),
        "labelled": bool(rec.get("labelled", True)),
        "header": "{}", "deid_audit": "{}", "status": status, "reason": reason,
    }
    row.update(facts)
    return row


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


def process_record(rec: dict, cfg: IngestConfig, ps: Pseudonymizer) -> list[dict]:
    """Decode, filter, de-identify and pair one record with its report; never raises."""
    try:
        return _process(rec, cfg, ps)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # last line of defence (native decoders can raise non-Exceptions): reveal nothing
        return [_row(rec, ps, "quarantined", "internal_error")]


def _process(rec: dict, cfg: IngestConfig, ps: Pseudonymizer) -> list[dict]:
    try:
        ds = read_dataset(rec["image_path"], max_file_bytes=cfg.max_file_bytes)
    except DicomDecodeError as err:
        return [_row(rec, ps, "quarantined", err.reason)]
    meta = getattr(ds, "file_meta", None)
    tsyntax = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    facts = {"modality": safe_code(ds.get("Modality")),
             "transfer_syntax": tsyntax if tsyntax.replace(".", "").isdigit() else ""}
    if not any(k in ds for k in _PIXEL_KEYWORDS) and "Rows" not in ds:
        return [_row(rec, ps, "filtered", "non_image_object", **facts)]
    if cfg.quarantine_burned_in and has_burned_in_annotation(ds):
        return [_row(rec, ps, "quarantined", "burned_in_annotation", **facts)]
    view = safe_code(ds.get("ViewPosition")) or str(rec.get("view_hint") or "").upper()
    facts["view"] = view
    if cfg.views and view not in {v.upper() for v in cfg.views}:
        return [_row(rec, ps, "filtered", "view_not_selected", **facts)]
    report = _read_report(rec)
    if report is None:
        return [_row(rec, ps, "quarantined", "missing_report", **facts)]
    try:
        frames = frame_indices(ds, cfg.frames)
        decoded = [decode_dicom(ds, size=cfg.image_size, apply_voi=cfg.apply_voi, frame=f,
                                max_decoded_bytes=cfg.max_decoded_bytes, max_file_bytes=cfg.max_file_bytes)
                   for f in frames]
    except DicomDecodeError as err:
        if err.reason == "no_pixel_data":
            return [_row(rec, ps, "filtered", "non_image_object", **facts)]
        return [_row(rec, ps, "quarantined", err.reason, **facts)]
    res = deidentify(ds, report, ps, patient_id=rec.get("patient_id"), study_id=rec.get("study_id"))
    context, context_status = clinical_context_checked(res.report)  # "" unless the indication is usable
    common = {
        "record_id": rec["record_id"], **_ids(rec, ps), "split": rec["split"], **facts,
        "image_size": cfg.image_size, "context": context, "context_status": context_status, "report": res.report,
        "labels": list(rec["labels"]), "labelled": bool(rec.get("labelled", True)),
        "header": json.dumps(res.header, sort_keys=True, default=str),
        "deid_audit": json.dumps(res.audit, sort_keys=True), "status": "ok", "reason": "",
    }
    rows = []
    for frame, image in zip(frames, decoded):
        blob = pixels_to_bytes(image.pixels)
        image_id = rec["record_id"] if len(frames) == 1 else f"{rec['record_id']}:{frame}"
        rows.append({**common, "image_id": image_id, "frame": int(frame), "image": blob,
                     "image_sha1": hashlib.sha1(blob).hexdigest()})
    return rows
