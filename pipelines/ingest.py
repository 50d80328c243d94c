"""Ingest on Ray Data: raw DICOM + reports -> decoded Parquet shards + an accounting summary.

Output (written to a temporary folder and moved into place at the end, so a failed run leaves
nothing half-written)::

    DATA/shards/*.parquet        one row per ok image (see medfuse_core.records.ROW_FIELDS)
    DATA/ingest_summary.json     counts, per-reason quarantine, splits, digest, quarantine rows
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from medfuse_core.config import IngestConfig
from medfuse_core.deid import DEID_METHOD, Pseudonymizer, load_key
from medfuse_core.labels import CHEXPERT_LABELS
from medfuse_core.records import process_record
from medfuse_core.sources import FORMATS, SourceError, patients_in_several_splits
from medfuse_core.synth import SYNTHETIC_MARKER

log = logging.getLogger("medfuse")

SUMMARY_NAME = "ingest_summary.json"
SHARDS_DIR = "shards"
META_COLUMNS = ["record_id", "image_id", "patient_id", "split", "view", "modality", "transfer_syntax", "status",
                "reason", "image_sha1", "labels", "deid_audit"]


class IngestHealthError(RuntimeError):
    """A system fault, not a data fault (missing decoder, a group quarantined wholesale): stop the job."""


def pseudonymizer_for(cfg: IngestConfig, root: str | Path) -> Pseudonymizer:
    """The keyed pseudonymizer: from the configured key, or the public key for a synthetic corpus only."""
    import os

    if cfg.deid.key_file or os.environ.get(cfg.deid.key_env):
        return Pseudonymizer(load_key(cfg.deid.key_env, cfg.deid.key_file))
    root = Path(root)
    if (root if root.is_dir() else root.parent).joinpath(SYNTHETIC_MARKER).is_file():
        log.info("ingest: synthetic corpus marker found; using the public synthetic-data key")
        return Pseudonymizer.for_synthetic_data()
    return Pseudonymizer(load_key(cfg.deid.key_env, cfg.deid.key_file))  # raises DeidKeyError with help


def _process_batch(batch: dict, cfg_json: str, ps: Pseudonymizer) -> dict:
    cfg = IngestConfig.model_validate_json(cfg_json)
    keys = list(batch.keys())
    n = len(batch[keys[0]])
    rows = [row for i in range(n) for row in process_record({k: _py(batch[k][i]) for k in keys}, cfg, ps)]
    return {field: [row[field] for row in rows] for field in rows[0]}


def _py(value):
    """numpy scalars/arrays from Ray Data back to plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def dataset_digest(rows) -> str:
    """Content digest of the ok rows: record ids, splits, image hashes and labels."""
    h = hashlib.sha256()
    for rec in sorted(rows, key=lambda r: r["record_id"]):
        h.update(f"{rec['record_id']}|{rec['split']}|{rec['image_sha1']}|{rec['labels']}\n".encode())
    return h.hexdigest()


def run(fmt: str, root: str | Path, out: str | Path, cfg: IngestConfig | None = None) -> dict:
    """Ingest ``root`` (format ``fmt``) into ``out``; returns the summary dict."""
    import ray

    from pipelines.runtime import init_ray

    cfg = cfg or IngestConfig()
    if fmt not in FORMATS:
        raise SourceError(f"--format: unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SourceError(f"--out: {out} exists and is not an empty folder; choose a new one")
    t0 = time.time()
    ps = pseudonymizer_for(cfg, root)  # fails on a missing key before anything is read
    if fmt == "manifest":
        records, pre_quarantined = FORMATS[fmt](root, record_id_map=lambda rid: ps.pseudonym("record", rid))
    else:
        records, pre_quarantined = FORMATS[fmt](root)
    leaks = patients_in_several_splits(records)
    if leaks:
        raise SourceError(f"split: {len(leaks)} patients appear in more than one split; refusing a leaking split")
    log.info("ingest: %d records listed (%d quarantined before decoding)", len(records) + len(pre_quarantined),
             len(pre_quarantined))

    init_ray()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        rows_meta = []
        if records:
            n_blocks = max(1, min(len(records) // 16, 200))
            ds = ray.data.from_items(records, override_num_blocks=n_blocks)
            ds = ds.map_batches(_process_batch, fn_kwargs={"cfg_json": cfg.model_dump_json(), "ps": ps},
                                batch_size=16, batch_format="numpy").materialize()
            ok = ds.filter(expr="status == 'ok'").drop_columns(["status", "reason"])
            n_ok = ok.count()
            if n_ok:
                ok.repartition(max(1, -(-n_ok // cfg.rows_per_shard))).write_parquet(
                    str(staging / SHARDS_DIR))
            rows_meta = ds.select_columns(META_COLUMNS).to_pandas().to_dict("records")
        processed = {r["record_id"] for r in rows_meta}
        if len(processed) != len(records):  # every listed record must come back with an outcome
            raise IngestHealthError(f"{len(records) - len(processed)} records came back from decoding "
                                    "without an outcome; refusing an incomplete ingest")
        summary = summarise(rows_meta, pre_quarantined, fmt, cfg, time.time() - t0)
        summary["deid"] = {"method": DEID_METHOD, "key_id": ps.key_id, "synthetic_key": ps.synthetic}
        log.info("ingest: %d ok, %d quarantined, %d filtered; patients in several splits: %d",
                 summary["n_ok"], summary["n_quarantined"], summary["n_filtered"],
                 summary["patients_in_several_splits"])
        check_health(summary, cfg)
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2))
        if out.exists():
            if any(out.iterdir()):
                raise SourceError(f"--out: {out} is not empty")
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def summarise(rows: list[dict], pre_quarantined: list[dict], fmt: str, cfg: IngestConfig, seconds: float) -> dict:
    """Accounting per record: records in = ok + quarantined + filtered, per reason, split, label, group."""
    records: dict[str, dict] = {}
    for row in rows:  # a multi-frame record has one row per frame; the record's status is shared
        records.setdefault(row["record_id"], row)
    recs = list(records.values())
    quarantine = [{"record_id": q["record_id"], "reason": q["reason"]} for q in pre_quarantined]
    quarantine += [{"record_id": r["record_id"], "reason": r["reason"]} for r in recs if r["status"] == "quarantined"]
    filtered = [{"record_id": r["record_id"], "reason": r["reason"]} for r in recs if r["status"] == "filtered"]
    ok_recs = [r for r in recs if r["status"] == "ok"]
    ok_rows = [r for r in rows if r["status"] == "ok"]
    per_split = Counter(r["split"] for r in ok_rows)
    patients = {s: len({r["patient_id"] for r in ok_rows if r["split"] == s}) for s in per_split}
    leaks = patients_in_several_splits(ok_recs)
    positives = {s: Counter() for s in per_split}
    for r in ok_recs:
        for name, value in zip(CHEXPERT_LABELS, r["labels"]):
            if value == 1.0:
                positives[r["split"]][name] += 1
    audit: Counter = Counter()
    for r in ok_recs:
        audit.update(json.loads(r["deid_audit"] or "{}"))
    groups = {}
    for key in ("modality", "transfer_syntax"):
        counts: dict[str, Counter] = {}
        for r in recs:
            if r["status"] != "filtered":
                counts.setdefault(r[key] or "unknown", Counter())[r["status"]] += 1
        groups[key] = {g: {"n": sum(c.values()), "quarantined": c["quarantined"]} for g, c in counts.items()}
    n_records = len(recs) + len(pre_quarantined)
    summary = {
        "format": fmt,
        "n_records": n_records,
        "n_ok": len(ok_recs),
        "n_quarantined": len(quarantine),
        "n_filtered": len(filtered),
        "n_images": len(ok_rows),
        "quarantine_by_reason": dict(Counter(q["reason"] for q in quarantine)),
        "filtered_by_reason": dict(Counter(f["reason"] for f in filtered)),
        "groups": groups,
        "unsupported_transfer_syntaxes": sorted({r["transfer_syntax"] for r in recs
                                                 if r["reason"] == "unsupported_transfer_syntax"}),
        "splits": dict(per_split),
        "patients_per_split": patients,
        "patients_in_several_splits": len(leaks),
        "label_positives": {s: dict(c) for s, c in positives.items()},
        "label_names": list(CHEXPERT_LABELS),
        "deid_audit": dict(audit),
        "image_size": cfg.image_size,
        "config": cfg.model_dump(exclude={"deid"}),
        "digest": dataset_digest(ok_rows),
        "seconds": round(seconds, 1),
        "quarantine": sorted(quarantine, key=lambda q: q["record_id"]),
        "filtered": sorted(filtered, key=lambda f: f["record_id"]),
    }
    assert summary["n_records"] == summary["n_ok"] + summary["n_quarantined"] + summary["n_filtered"]
    return summary


def check_health(summary: dict, cfg: IngestConfig) -> None:
    """Stop on system faults: a missing decoder, or one modality / transfer syntax quarantined wholesale."""
    if summary["unsupported_transfer_syntaxes"]:
        n = summary["quarantine_by_reason"].get("unsupported_transfer_syntax", 0)
        raise IngestHealthError(
            f"{n} images use transfer syntaxes with no installed pixel decoder "
            f"({', '.join(summary['unsupported_transfer_syntaxes'])}); install the decoder plugins "
            "(pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, python-gdcm) instead of quarantining them")
    for key, groups in summary["groups"].items():
        for group, c in groups.items():
            rate = c["quarantined"] / c["n"] if c["n"] else 0.0
            if c["n"] >= cfg.min_group_for_rate and rate > cfg.max_quarantine_rate:
                raise IngestHealthError(
                    f"{c['quarantined']} of {c['n']} images with {key} {group} were quarantined ({rate:.0%} > "
                    f"max_quarantine_rate {cfg.max_quarantine_rate:.0%}): this looks like a system fault "
                    "(decoder, storage, export), not bad data; see quarantine_by_reason")
    if summary["patients_in_several_splits"]:
        raise IngestHealthError(f"{summary['patients_in_several_splits']} patients are in more than one split")


def load_summary(data_dir: str | Path) -> dict:
    """Read DATA/ingest_summary.json, with a clear error when DATA is not an ingest output."""
    path = Path(data_dir) / SUMMARY_NAME
    if not path.is_file():
        raise SourceError(f"--data: {data_dir} holds no {SUMMARY_NAME}; run `medfuse ingest` first")
    return json.loads(path.read_text())
