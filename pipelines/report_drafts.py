"""Drafting reports with a trained report model: ``medfuse report`` (one DICOM file) and
``medfuse generate`` (every image of a split, in a Ray Data actor pool, written to CSV as the
drafts stream back; nothing but ids and drafts reaches the driver)."""

from __future__ import annotations

import csv
import logging
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from medfuse_core.data.sources import SourceError
from pipelines.model_refs import resolve_model
from pipelines.shards import has_split, read_split

log = logging.getLogger("medfuse")

BATCH_SIZE = 16
COLUMNS = ["record_id", "image_id", "image", "image_size", "context", "report"]


class _Drafter:
    """Ray Data callable class: loads the report bundle once per actor, drafts batches."""

    def __init__(self, bundle_dir: str, overrides: Sequence[str] = (), threads: int = 1):
        import torch

        from medfuse_core.evaluation.report_inference import decoding_settings
        from medfuse_core.models.bundle import load_bundle

        torch.set_num_threads(max(1, int(threads)))
        self.bundle = load_bundle(bundle_dir, device="cuda" if torch.cuda.is_available() else "cpu")
        self.settings = decoding_settings(self.bundle, overrides)

    def __call__(self, rows: dict) -> dict:
        from medfuse_core.evaluation.report_inference import draft_rows
        from medfuse_core.models.report import report_target
        from medfuse_core.data.reports import extract_sections

        sections = tuple((self.bundle.extra or {}).get("text_sections", ("findings", "impression")))
        references = [report_target(extract_sections(r if isinstance(r, str) else ""), sections)
                      for r in rows["report"]]
        return {"record_id": np.asarray(rows["record_id"]), "image_id": np.asarray(rows["image_id"]),
                "report": np.asarray(draft_rows(self.bundle, rows, self.settings), dtype=object),
                "reference": np.asarray(references, dtype=object)}


def check_report_bundle(bundle_dir: Path, ref: str) -> dict:
    """The bundle's metadata; a ``UsageError``-style ``SourceError`` unless it is a report model."""
    from medfuse_core.models.bundle import read_bundle_meta

    meta = read_bundle_meta(bundle_dir)
    if meta.get("kind") != "report":
        raise SourceError(f"--model: {ref} is a {meta.get('kind', 'diagnosis')} model, not a report model; "
                          "train one with `medfuse train-report --config experiments/report_cxr_cpu.yaml ...`")
    return meta


def draft_split(bundle_dir: Path, data_dir: Path, split: str, overrides: Sequence[str] = ()) -> Iterator[dict]:
    """Batches ``{"record_id", "image_id", "report", "reference"}`` for every image of ``split``, streamed."""
    import ray

    from pipelines.runtime import scorer_resources

    res = scorer_resources(ray.cluster_resources())
    log.info("drafting %s with up to %d actor(s)", split, res["max_size"])
    ds = read_split(data_dir, split, COLUMNS).map_batches(
        _Drafter, batch_size=BATCH_SIZE, batch_format="numpy",
        fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "overrides": list(overrides), "threads": res["threads"]},
        compute=ray.data.ActorPoolStrategy(min_size=res["min_size"], max_size=res["max_size"]),
        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"])
    yield from ds.iter_batches(batch_format="numpy", batch_size=None)


def generate(model_ref: str, data_dir: str | Path, split: str, out: str | Path, overrides: Sequence[str] = ()) -> dict:
    """Write ``out`` (CSV: ``record_id``, ``report``; one row per image) for a split; returns counts.

    The file is written beside ``out`` and moved into place when complete (nothing partial)."""
    from medfuse_core.evaluation.report_inference import decoding_settings
    from medfuse_core.models.bundle import load_bundle
    from pipelines.console import progress_bar
    from pipelines.ingest import load_summary
    from pipelines.runtime import init_ray

    data_dir, out = Path(data_dir), Path(out)
    summary = load_summary(data_dir)
    if not has_split(data_dir, split):
        raise SourceError(f"--split: the {split} split of --data is empty")
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir, _ = resolve_model(model_ref, Path(tmp))
        check_report_bundle(bundle_dir, model_ref)
        decoding_settings(load_bundle(bundle_dir), overrides)  # a bad override fails before any work
        init_ray()
        out.parent.mkdir(parents=True, exist_ok=True)
        partial = out.with_name(f".{out.name}.partial")
        n = 0
        total = int(summary["splits"].get(split, 0)) or None
        with open(partial, "w", newline="") as fh, progress_bar("generate", total) as bar:
            writer = csv.writer(fh)
            writer.writerow(["record_id", "report"])
            for batch in draft_split(bundle_dir, data_dir, split, overrides):
                for image_id, text in zip(batch["image_id"], batch["report"]):
                    writer.writerow([str(image_id), str(text)])
                n += len(batch["report"])
                bar(len(batch["report"]))
        partial.replace(out)
    return {"rows": n, "split": split, "out": str(out)}


def report_one(model_ref: str, dicom: str | Path, context: str | None = None, overrides: Sequence[str] = ()) -> str:
    """The draft for one DICOM file (decoded the way ingest decodes it)."""
    from medfuse_core.data.dicom import DicomDecodeError, decode_dicom
    from medfuse_core.data.records import as_stored
    from medfuse_core.evaluation.report_inference import decoding_settings, draft_images
    from medfuse_core.models.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir, _ = resolve_model(model_ref, Path(tmp))
        check_report_bundle(bundle_dir, model_ref)
        bundle = load_bundle(bundle_dir)
    settings = decoding_settings(bundle, overrides)
    try:
        image = decode_dicom(str(dicom), bundle.image_size)
    except DicomDecodeError as err:
        raise SourceError(f"--dicom: cannot decode the file ({err.reason})") from None
    return draft_images(bundle, [as_stored(image.pixels)], [context or ""], settings)[0]
