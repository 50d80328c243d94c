"""Ingest on Ray Data: raw DICOM + reports -> decoded Parquet shards + an accounting summary.

One streaming pass: records flow decode -> de-identify -> Parquet a few at a time, without
materialising the dataset or repartitioning it before the first write. The map step writes
each batch's outcome rows (ids and reason codes only: no pixels, no text) to a small side
table as it goes and hands only the ok rows on to ``write_parquet``, partitioned by split.
Everything is written to a temporary folder and moved into place at the end, so a failed or
stopped run leaves nothing (layout: :mod:`pipelines.shards`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path

from medfuse_core.config import IngestConfig
from medfuse_core.data.deid import DEID_METHOD, Pseudonymizer, load_key
from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.data.records import process_record
from medfuse_core.data.sources import FORMATS, SourceError, patients_in_several_splits
from medfuse_core.data.synth import SYNTHETIC_MARKER
from pipelines.shards import OUTCOMES_DIR, SHARDS_DIR

log = logging.getLogger("medfuse")

SUMMARY_NAME = "ingest_summary.json"
__all__ = ["run", "load_summary", "IngestHealthError", "SUMMARY_NAME", "SHARDS_DIR", "OUTCOMES_DIR"]

_BATCH = 16  # records per map task call: small, so a task holds a few decoded images at a time


def _schemas():
    """Arrow schemas of a shard row and an outcome row (fixed, so empty batches still type-check)."""
    import pyarrow as pa

    common = [("record_id", pa.string()), ("image_id", pa.string()), ("patient_id", pa.string()),
              ("split", pa.string()), ("view", pa.string()), ("modality", pa.string()),
              ("transfer_syntax", pa.string()), ("image_sha1", pa.string()),
              ("labels", pa.list_(pa.float32())), ("labelled", pa.bool_()), ("context_status", pa.string()),
              ("deid_audit", pa.string())]
    shard = pa.schema(common + [("frame", pa.int32()), ("study_id", pa.string()), ("image", pa.binary()),
                                ("image_size", pa.int32()), ("context", pa.string()), ("report", pa.string()),
                                ("header", pa.string())])
    outcome = pa.schema(common + [("status", pa.string()), ("reason", pa.string())])
    return shard, outcome


def _table(rows: list[dict], schema):
    import pyarrow as pa

    defaults = {"labelled": True, "context_status": ""}
    return pa.Table.from_pydict({f.name: [r.get(f.name, defaults.get(f.name)) for r in rows] for f in schema},
                                schema=schema)


class IngestHealthError(RuntimeError):
    """A system fault, not a data fault (missing decoder, a group quarantined wholesale): stop the job."""


def pseudonymizer_for(cfg: IngestConfig, root: str | Path) -> Pseudonymizer:
    """The keyed pseudonymizer: from the configured key, or the public key for a synthetic corpus only."""
    if cfg.deid.key_file or os.environ.get(cfg.deid.key_env):
        return Pseudonymizer(load_key(cfg.deid.key_env, cfg.deid.key_file))
    root = Path(root)
    if (root if root.is_dir() else root.parent).joinpath(SYNTHETIC_MARKER).is_file():
        log.info("ingest: synthetic corpus marker found; using the public synthetic-data key")
        return Pseudonymizer.for_synthetic_data()
    return Pseudonymizer(load_key(cfg.deid.key_env, cfg.deid.key_file))  # raises DeidKeyError with help


def _process_batch(batch: dict, cfg_json: str, ps: Pseudonymizer, outcomes_dir: str):
    """Map step: process each record, write the batch's outcome rows aside, return the ok rows.

    The outcome file is named after the batch's record ids, so a retried task rewrites the
    same file instead of adding a second copy.
    """
    import pyarrow.parquet as pq

    _one_thread()
    cfg = IngestConfig.model_validate_json(cfg_json)
    shard_schema, outcome_schema = _schemas()
    keys = list(batch.keys())
    n = len(batch[keys[0]])
    records = [{k: _py(batch[k][i]) for k in keys} for i in range(n)]
    rows = [row for rec in records for row in process_record(rec, cfg, ps)]
    name = hashlib.sha1("\n".join(r["record_id"] for r in records).encode()).hexdigest()[:20]
    tmp = os.path.join(outcomes_dir, f".{name}.tmp")
    pq.write_table(_table(rows, outcome_schema), tmp)
    os.replace(tmp, os.path.join(outcomes_dir, f"part-{name}.parquet"))
    return _table([r for r in rows if r["status"] == "ok"], shard_schema)


def _n_blocks(n_records: int, rows_per_shard: int) -> int:
    """Blocks of about ``rows_per_shard`` records (one shard file per split each: the fused map +
    write task holds one block's images), but at least two per CPU so small corpora still use
    every core (eight per CPU measured 15% slower on 200 rows: more task start-up and finalisation
    than overlap; docs/performance.md)."""
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, -(-n_records // rows_per_shard), min(-(-n_records // _BATCH), 2 * cpus))


def _one_thread() -> None:
    """A map task holds one CPU: keep OpenCV and torch from spawning a thread per core each."""
    import cv2
    import torch

    cv2.setNumThreads(1)
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)


def _py(value):
    """numpy scalars/arrays from Ray Data back to plain Python values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


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
    if fmt in ("manifest", "dicom-dir"):
        records, pre_quarantined = FORMATS[fmt](root, record_id_map=lambda rid: ps.pseudonym("record", rid))
    else:
        records, pre_quarantined = FORMATS[fmt](root)
    leaks = patients_in_several_splits(records)
    if leaks:
        raise SourceError(f"split: {len(leaks)} patients appear in more than one split; refusing a leaking split")
    log.info("ingest: %d records listed (%d quarantined before decoding)", len(records) + len(pre_quarantined),
             len(pre_quarantined))
    # a seeded order, so each shard file holds a random sample of studies (block-level shuffling
    # in training is then nearly as good as a full shuffle)
    random.Random(cfg.seed).shuffle(records)

    init_ray()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        outcomes = staging / OUTCOMES_DIR
        outcomes.mkdir()
        if records:
            ds = ray.data.from_items(records, override_num_blocks=_n_blocks(len(records), cfg.rows_per_shard))
            ds = ds.map_batches(_process_batch, batch_size=_BATCH, batch_format="numpy",
                                fn_kwargs={"cfg_json": cfg.model_dump_json(), "ps": ps,
                                           "outcomes_dir": str(outcomes)})
            ds.write_parquet(str(staging / SHARDS_DIR), partition_cols=["split"])
        summary = summarise(outcomes, pre_quarantined, fmt, cfg, time.time() - t0)
        if summary["n_records"] - len(pre_quarantined) != len(records):
            raise IngestHealthError(f"{len(records) - summary['n_records'] + len(pre_quarantined)} records came "
                                    "back from decoding without an outcome; refusing an incomplete ingest")
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


def _row_digest(row: dict) -> int:
    text = (f"{row['record_id']}|{row['image_id']}|{row['split']}|{row['image_sha1']}|{list(row['labels'])}|"
            f"{row['labelled']}")
    return int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")


def summarise(outcomes_dir: Path, pre_quarantined: list[dict], fmt: str, cfg: IngestConfig, seconds: float) -> dict:
    """Accounting per record, streamed over the outcome table (ids and codes, a batch at a time):
    records in = ok + quarantined + filtered, per reason, split, label, group, context status.

    The digest is order-independent (a sum of per-image hashes), so it does not depend on
    the order in which parallel tasks finished.
    """
    import pyarrow.dataset as pads

    quarantine = [{"record_id": q["record_id"], "reason": q["reason"]} for q in pre_quarantined]
    filtered: list[dict] = []
    seen: set[str] = set()
    per_split, context, audit = Counter(), Counter(), Counter()
    patients: dict[str, set] = {}
    positives: dict[str, Counter] = {}
    labelled = Counter()
    groups: dict[str, dict[str, Counter]] = {"modality": {}, "transfer_syntax": {}}
    unsupported: set[str] = set()
    digest, n_ok = 0, 0
    if any(outcomes_dir.glob("*.parquet")):
        table = pads.dataset(str(outcomes_dir), format="parquet")
        for batch in table.to_batches(batch_size=4096):
            for row in batch.to_pylist():
                if row["status"] == "ok":
                    per_split[row["split"]] += 1
                    digest = (digest + _row_digest(row)) % (1 << 256)
                    patients.setdefault(row["patient_id"], set()).add(row["split"])
                    labelled[row["split"]] += bool(row["labelled"])
                if row["record_id"] in seen:  # one row per frame: the record counts once
                    continue
                seen.add(row["record_id"])
                status = row["status"]
                if status == "quarantined":
                    quarantine.append({"record_id": row["record_id"], "reason": row["reason"]})
                    if row["reason"] == "unsupported_transfer_syntax":
                        unsupported.add(row["transfer_syntax"])
                elif status == "filtered":
                    filtered.append({"record_id": row["record_id"], "reason": row["reason"]})
                else:
                    n_ok += 1
                    context[row["context_status"] or "unknown"] += 1
                    audit.update(json.loads(row["deid_audit"] or "{}"))
                    pos = positives.setdefault(row["split"], Counter())
                    for name, value in zip(CHEXPERT_LABELS, row["labels"]):
                        if value == 1.0:
                            pos[name] += 1
                if status != "filtered":
                    for key in groups:
                        groups[key].setdefault(row[key] or "unknown", Counter())[status] += 1
    leaks = sum(len(s) > 1 for s in patients.values())
    patients_per_split = Counter(s for splits in patients.values() for s in splits)
    summary = {
        "format": fmt,
        "n_records": len(seen) + len(pre_quarantined),
        "n_ok": n_ok,
        "n_quarantined": len(quarantine),
        "n_filtered": len(filtered),
        "n_images": sum(per_split.values()),
        "quarantine_by_reason": dict(Counter(q["reason"] for q in quarantine)),
        "filtered_by_reason": dict(Counter(f["reason"] for f in filtered)),
        "groups": {key: {g: {"n": sum(c.values()), "quarantined": c["quarantined"]} for g, c in counts.items()}
                   for key, counts in groups.items()},
        "unsupported_transfer_syntaxes": sorted(unsupported),
        "splits": dict(per_split),
        "patients_per_split": dict(patients_per_split),
        "patients_in_several_splits": leaks,
        "labelled_images_per_split": dict(labelled),
        "label_positives": {s: dict(c) for s, c in positives.items()},
        "label_names": list(CHEXPERT_LABELS),
        "context": dict(context),
        "deid_audit": dict(audit),
        "image_size": cfg.image_size,
        "config": cfg.model_dump(exclude={"deid"}),
        "digest": f"{digest:064x}",
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
    summary = json.loads(path.read_text())
    if not (Path(data_dir) / SHARDS_DIR).is_dir() or not any((Path(data_dir) / SHARDS_DIR).glob("split=*")):
        if summary.get("n_images"):
            raise SourceError(f"--data: {data_dir} was written by an older medfuse (shards not partitioned by "
                              "split); ingest it again with `medfuse ingest`")
    return summary
