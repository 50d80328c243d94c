"""``medfuse predict``: batch inference with a diagnosis model on Ray Data.

The input goes through the ingest path first (decode, de-identify, quarantine with a reason;
``dicom-dir``, ``manifest`` or ``mimic-cxr``) into a temporary folder, at the model's image
size; then an actor pool sized to the cluster scores every image, and rows stream into the
output (CSV or Parquet) as they come back. One row per image: ``record_id`` (the ``dicom_id``
for the MIMIC-CXR layout, else the record's pseudonymous id), ``context_used``, then per finding
``prob:<label>`` (the calibrated probability: image-only, or image + clinical context when the
input has one) and ``pred:<label>`` (0/1 at the operating point chosen on validation). A bad
file gets no prediction row, only a row in ``<out>.quarantine.csv`` (record id and reason code).
"""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path

import numpy as np

from medfuse_core.config import IngestConfig
from medfuse_core.data.sources import SourceError
from pipelines.model_refs import resolve_model

log = logging.getLogger("medfuse")

BATCH_SIZE = 64
COLUMNS = ["image_id", "image", "image_size", "context"]
FORMATS = ("dicom-dir", "manifest", "mimic-cxr")


def output_columns(labels: list[str]) -> list[str]:
    """The prediction table's columns, in order."""
    return ["record_id", "context_used"] + [f"prob:{n}" for n in labels] + [f"pred:{n}" for n in labels]


class _Predictor:
    """Ray Data callable class: loads the diagnosis bundle once per actor, predicts batches."""

    def __init__(self, bundle_dir: str, threads: int = 1):
        import torch

        from medfuse_core.models.bundle import load_bundle

        torch.set_num_threads(max(1, int(threads)))
        self.bundle = load_bundle(bundle_dir)

    def __call__(self, rows: dict) -> dict:
        from medfuse_core.data.batching import blobs_to_images
        from medfuse_core.evaluation.inference import predict_frame

        images = blobs_to_images(rows["image"], rows["image_size"])
        out = predict_frame(self.bundle, images, [c if isinstance(c, str) else "" for c in rows["context"]])
        return {"record_id": np.asarray(rows["image_id"]), "context_used": out["context_used"].astype(np.int8),
                "prob": out["prob"], "pred": out["pred"]}


class _Writer:
    """Rows to CSV or Parquet as they arrive; the file is moved into place when complete."""

    def __init__(self, out: Path, labels: list[str]):
        self.out, self.labels = out, labels
        self.partial = out.with_name(f".{out.name}.partial")
        self.parquet = out.suffix == ".parquet"
        self.columns = output_columns(labels)
        self._pq = None
        self._fh = None if self.parquet else open(self.partial, "w", newline="")
        if self._fh is not None:
            self._csv = csv.writer(self._fh)
            self._csv.writerow(self.columns)

    def write(self, batch: dict) -> int:
        n = len(batch["record_id"])
        prob, pred = np.asarray(batch["prob"]).reshape(n, -1), np.asarray(batch["pred"]).reshape(n, -1)
        if self.parquet:
            import pyarrow as pa
            import pyarrow.parquet as pq

            cols = {"record_id": pa.array([str(r) for r in batch["record_id"]]),
                    "context_used": pa.array(np.asarray(batch["context_used"], np.int8))}
            cols.update({f"prob:{name}": pa.array(prob[:, j]) for j, name in enumerate(self.labels)})
            cols.update({f"pred:{name}": pa.array(pred[:, j].astype(np.int8)) for j, name in enumerate(self.labels)})
            table = pa.table(cols)
            if self._pq is None:
                self._pq = pq.ParquetWriter(str(self.partial), table.schema)
            self._pq.write_table(table)
        else:
            for k in range(n):
                self._csv.writerow([str(batch["record_id"][k]), int(batch["context_used"][k]),
                                    *(f"{v:.6f}" for v in prob[k]), *(int(v) for v in pred[k])])
        return n

    def close(self, ok: bool) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._pq is not None:
            self._pq.close()
        elif self.parquet and ok:  # no image scored: an empty table with the columns
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pa.schema([("record_id", pa.string()), ("context_used", pa.int8())]
                               + [(f"prob:{n}", pa.float32()) for n in self.labels]
                               + [(f"pred:{n}", pa.int8()) for n in self.labels])
            pq.write_table(schema.empty_table(), str(self.partial))
        if ok:
            self.partial.replace(self.out)
        else:
            self.partial.unlink(missing_ok=True)


def run(model_ref: str, input_path: str | Path, fmt: str, out: str | Path, ingest_overrides=()) -> dict:
    """Predict every image of ``input_path``; write ``out`` and ``<out>.quarantine.csv``; returns a summary."""
    import ray

    from medfuse_core.experiment import load_config
    from medfuse_core.models.bundle import read_bundle_meta
    from pipelines import ingest
    from pipelines.console import progress_bar
    from pipelines.runtime import init_ray, scorer_resources
    from pipelines.shards import has_split, read_split

    out = Path(out)
    if fmt not in FORMATS:
        raise SourceError(f"--format: choose one of {list(FORMATS)}")
    if out.suffix not in (".csv", ".parquet"):
        raise SourceError(f"--out: {out.name} must end in .csv or .parquet")
    with tempfile.TemporaryDirectory(prefix="medfuse-predict-") as tmp:
        bundle_dir, _ = resolve_model(model_ref, Path(tmp))
        meta = read_bundle_meta(bundle_dir)
        if meta.get("kind", "diagnosis") != "diagnosis":
            raise SourceError(f"--model: {model_ref} is a {meta['kind']} model; medfuse predict needs a diagnosis "
                              "model (`medfuse finetune ...`)")
        labels = list(meta["label_names"])
        cfg = load_config(None, [f"image_size={int(meta['image_size'])}", *ingest_overrides], schema=IngestConfig)
        init_ray()
        data = Path(tmp) / "data"
        summary = ingest.run(fmt, input_path, data, cfg)
        out.parent.mkdir(parents=True, exist_ok=True)
        writer, n, ok = _Writer(out, labels), 0, False
        res = scorer_resources(ray.cluster_resources())
        try:
            with progress_bar("predict", summary["n_images"] or None) as advance:
                for split in ("train", "validate", "test"):
                    if not has_split(data, split):
                        continue
                    ds = read_split(data, split, COLUMNS).map_batches(
                        _Predictor, batch_size=BATCH_SIZE, batch_format="numpy",
                        fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "threads": res["threads"]},
                        compute=ray.data.ActorPoolStrategy(min_size=res["min_size"], max_size=res["max_size"]),
                        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"])
                    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                        done = writer.write(batch)
                        n += done
                        advance(done)
            ok = True
        finally:
            writer.close(ok)
    quarantine_path = out.with_name(f"{out.name}.quarantine.csv")
    with open(quarantine_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["record_id", "status", "reason"])
        for q in summary["quarantine"]:
            w.writerow([q["record_id"], "quarantined", q["reason"]])
        for f in summary["filtered"]:
            w.writerow([f["record_id"], "filtered", f["reason"]])
    return {"out": str(out), "n_predicted": n, "n_records": summary["n_records"], "n_quarantined": summary["n_quarantined"],
            "n_filtered": summary["n_filtered"], "quarantine_by_reason": summary["quarantine_by_reason"],
            "filtered_by_reason": summary["filtered_by_reason"], "quarantine_file": str(quarantine_path)}
