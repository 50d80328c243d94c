"""Score the test split: image-only and image + clinical context, with thresholds from validation.

``--model`` may be a finetune workdir, a bundle folder, an MLflow run id, or a model URI
(``runs:/<id>/model``, ``models:/<name>@candidate``). Metrics go to ``--out`` and, when the
model came from an MLflow run, to that run (test/ metrics, ROC, per-label and calibration plots,
the evaluated dataset as an ``evaluation`` input). Patient images (attention maps) are logged
only with ``log_images=True`` (``medfuse evaluate --log-images``).

Only the validate and test splits are read, labelled rows only, the diagnosis columns only.
Scoring runs in a pool of actors sized from the cluster; only the per-row outputs (targets and
two probability vectors, a few floats per row) come back to the driver.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from medfuse_core.evaluation.metrics import choose_thresholds, multilabel_metrics
from medfuse_core.data.sources import SourceError
from pipelines import tracking
from pipelines.model_refs import resolve_model  # noqa: F401  (re-exported for callers)
from pipelines.runtime import scorer_resources
from pipelines.ingest import load_summary
from pipelines.shards import DIAGNOSIS_COLUMNS, has_split, read_split, read_split_table

log = logging.getLogger("medfuse")

MODES = ("image_only", "image_text")
RAW = tuple(f"{m}_raw" for m in MODES)  # before temperature scaling
EVAL_SPLITS = ("validate", "test")
BATCH_SIZE = 64


class _OnDevice:
    """Wraps a model on an accelerator so CPU-side callers (``score_rows``) hand it CPU tensors
    and get CPU tensors back."""

    def __init__(self, model, device: str):
        self.model, self.device = model, device

    def eval(self):
        self.model.eval()
        return self

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, images, **kwargs):
        import torch

        moved = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = self.model(images.to(self.device), **moved)
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in out.items()}


class _Scorer:
    """Ray Data callable class: loads the bundle once per actor, scores batches.

    Returns only the small per-row outputs: split, evaluation targets, both probability vectors."""

    def __init__(self, bundle_dir: str, blank_policy: str, threads: int = 1):
        import dataclasses

        import torch

        from medfuse_core.data.batching import label_indices
        from medfuse_core.models.bundle import load_bundle

        torch.set_num_threads(max(1, int(threads)))
        if torch.cuda.is_available():
            bundle = load_bundle(bundle_dir, device="cuda")
            bundle = dataclasses.replace(bundle, model=_OnDevice(bundle.model, "cuda"))
        else:
            bundle = load_bundle(bundle_dir)
        self.bundle = bundle
        self.idx = label_indices(bundle.label_names)
        self.blank_policy = blank_policy

    def __call__(self, rows: dict) -> dict:
        from medfuse_core.evaluation.inference import score_rows
        from medfuse_core.data.labels import evaluation_targets

        scores = score_rows(self.bundle, rows)
        raw = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])[:, self.idx]
        return {"y": evaluation_targets(raw, blank_policy=self.blank_policy),
                **{k: np.asarray(scores[k], dtype=np.float32) for k in MODES + RAW}}


STORE_BATCHES_PER_ACTOR = 2  # image batches in flight per scoring actor (the object-store budget)


def score_splits(bundle_dir: str | Path, data_dir: str | Path, blank_policy: str = "negative",
                 splits=EVAL_SPLITS) -> dict[str, dict[str, np.ndarray]]:
    """Score the labelled rows of ``splits`` in an actor pool; ``{split: {"y", *MODES, *RAW: [N, L]}}``
    (``MODES`` calibrated by the bundle's temperatures when it has them, ``RAW`` before).

    Reads only those splits' shards and the diagnosis columns; a split with no shards gives
    empty arrays."""
    import ray

    from medfuse_core.models.bundle import read_bundle_meta

    n_labels = len(read_bundle_meta(bundle_dir)["label_names"])
    parts = {s: {k: [] for k in ("y",) + MODES + RAW} for s in splits}
    res = scorer_resources(ray.cluster_resources())
    ctx = ray.data.DataContext.get_current()
    before = ctx.execution_options.resource_limits
    # reads would otherwise run ahead of the scorers up to Ray Data's share of the whole store:
    # a fixed budget per scoring actor keeps the store flat whatever the corpus size
    # (blocks of about one batch, else a whole small split is read as one block)
    batch_bytes = BATCH_SIZE * 2 * int(read_bundle_meta(bundle_dir)["image_size"]) ** 2  # float16 pixels
    block_before = ctx.target_max_block_size
    ctx.target_max_block_size = batch_bytes
    ctx.execution_options.resource_limits = before.copy(
        object_store_memory=STORE_BATCHES_PER_ACTOR * batch_bytes * res["max_size"])
    try:
        for split in (s for s in splits if has_split(data_dir, s)):  # one streaming pass per split
            log.info("scoring %s with up to %d actor(s) of %d CPU(s)%s", split, res["max_size"],
                     res["num_cpus"], " and 1 GPU" if res["num_gpus"] else "")
            scored = read_split(data_dir, split, DIAGNOSIS_COLUMNS, labelled_only=True).map_batches(
                _Scorer, batch_size=BATCH_SIZE, batch_format="numpy",
                fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "blank_policy": blank_policy,
                                       "threads": res["threads"]},
                compute=ray.data.ActorPoolStrategy(min_size=res["min_size"], max_size=res["max_size"]),
                num_cpus=res["num_cpus"], num_gpus=res["num_gpus"])
            for batch in scored.iter_batches(batch_format="numpy", batch_size=None):
                for k in ("y",) + MODES + RAW:
                    parts[split][k].append(np.asarray(batch[k], dtype=np.float32))
    finally:
        ctx.execution_options.resource_limits, ctx.target_max_block_size = before, block_before
    return {s: {k: np.concatenate(v) if v else np.zeros((0, n_labels), np.float32) for k, v in d.items()}
            for s, d in parts.items()}


ATTENTION_COLUMNS = ["image", "image_size", "context"]


def attention_rows(data_dir: str | Path, n: int = 6):
    """At most ``n`` labelled test rows with a non-empty clinical context (image, size, context),
    the filter pushed into the Parquet scan, reading row groups only until ``n`` are found."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    has_context = pc.utf8_length(pc.utf8_trim_whitespace(pads.field("context"))) > 0
    return read_split_table(data_dir, "test", ATTENTION_COLUMNS, limit=n,
                            filter=has_context & (pads.field("labelled") == True))  # noqa: E712


def attention_figure(bundle_dir: Path, data_dir: Path, scored_labels=None, n: int = 6):
    """Text-to-image attention over a few test images that have clinical context; None (with a
    warning saying why) if the fusion module exposes no such map (concat, gated, image-only) or
    no test row has context. Titles name the top predictions among ``scored_labels`` (labels
    without training signal are left out)."""
    import torch

    from medfuse_core.data.batching import blobs_to_images, images_to_tensor, tokenize
    from medfuse_core.models.bundle import load_bundle
    from pipelines import plots

    table = attention_rows(data_dir, n)
    if table is None or table.num_rows == 0:
        log.warning("--log-images: no test image has clinical context; no attention maps logged")
        return None
    rows = table.to_pydict()
    bundle = load_bundle(bundle_dir)
    fusion = bundle.model_config.fusion.name
    if bundle.tokenizer is None:  # image-only model: no text, so no text-to-image map
        log.warning("--log-images: an image-only model has no text-to-image attention; no attention maps logged")
        return None
    images = blobs_to_images(rows["image"], rows["image_size"])
    tok = tokenize(bundle.tokenizer, rows["context"], bundle.model_config.text.max_tokens)
    with torch.no_grad():
        out = bundle.model(images_to_tensor(images, bundle.image_size), **tok)
    att = out["attention"].get("text_to_image")
    if att is None:
        log.warning("--log-images: the %s fusion module has no text-to-image attention; no attention maps logged",
                    fusion)
        return None
    real = tok["attention_mask"].float()
    amap = (att.float().sum(1) / real.sum(1, keepdim=True).clamp(min=1)).numpy()
    grid = bundle.model.token_grid(bundle.image_size, bundle.image_size)
    probs = torch.sigmoid(out["logits"]).numpy()
    keep = [j for j, name in enumerate(bundle.label_names) if scored_labels is None or name in scored_labels]
    titles = [", ".join(f"{bundle.label_names[j]} {p[j]:.2f}" for j in sorted(keep, key=lambda j: -p[j])[:2])
              for p in probs]
    resized = [np.asarray(images_to_tensor([im], bundle.image_size)[0, 0] * 0.25 + 0.5) for im in images]
    return plots.attention_maps(np.stack(resized), amap.reshape(len(images), *grid), titles)


def grad_cam_figure(bundle_dir: Path, data_dir: Path, scored_labels=None, n: int = 6):
    """Grad-CAM of each image's top finding (among ``scored_labels``) over a few labelled test images."""
    import torch

    from medfuse_core.data.batching import blobs_to_images, images_to_tensor
    from medfuse_core.evaluation.explain import grad_cam
    from medfuse_core.models.bundle import load_bundle
    from pipelines import plots

    table = read_split_table(data_dir, "test", ["image", "image_size"], limit=n)
    if table is None or table.num_rows == 0:
        return None
    rows = table.to_pydict()
    bundle = load_bundle(bundle_dir)
    images = blobs_to_images(rows["image"], rows["image_size"])
    x = images_to_tensor(images, bundle.image_size)
    with torch.no_grad():
        probs = torch.sigmoid(bundle.model(x)["logits"]).numpy()
    keep = [j for j, name in enumerate(bundle.label_names) if scored_labels is None or name in scored_labels]
    maps, titles = [], []
    for k in range(len(images)):
        j = max(keep, key=lambda j: probs[k, j]) if keep else 0
        maps.append(grad_cam(bundle.model, x[k:k + 1], j)[0])
        titles.append(f"{bundle.label_names[j]} {probs[k, j]:.2f}")
    shown = [np.asarray(x[k, 0] * 0.25 + 0.5) for k in range(len(images))]
    return plots.heat_maps(np.stack(shown), np.stack(maps), titles,
                           "Grad-CAM of each image's top finding (vision encoder, image-only)")


def _run_note(result: dict) -> str:
    """A short Markdown description for the MLflow run page."""
    source = ("Thresholds chosen on the validation split." if result["thresholds_from"] == "validate"
              else "**No labelled validation rows: thresholds are 0.5.**")
    lines = [f"**Test split**: {result['n_test']} images. {source}", "",
             "| scoring | macro AUROC | macro AUPRC | macro F1 |", "|---|---|---|---|"]
    for mode in MODES:
        m = result[mode]
        lines.append(f"| {mode} | {m['auroc_macro']:.3f} | {m['auprc_macro']:.3f} | {m['f1_macro']:.3f} |")
    lines += ["", "`image_text` sees the clinical context (indication) only, never findings or impression.",
              "Plots: `evaluation/roc_curves.png`, `evaluation/per_label_auroc.png`, "
              "`evaluation/reliability_image_only.png`, `evaluation/reliability_image_text.png` (before and after "
              "temperature scaling)."]
    return "\n".join(lines)


def _scorable(parts: dict, names: list[str]) -> list[str]:
    """Labels with both classes among the scored validate + test targets."""
    y_all = np.concatenate([parts[s]["y"] for s in EVAL_SPLITS])
    return [n for j, n in enumerate(names) if 0 < np.nansum(y_all[:, j]) < np.sum(~np.isnan(y_all[:, j]))]


def metrics_from_scores(parts: dict, names: list[str]) -> dict:
    """Thresholds chosen on validate (0.5 when it has no rows), metrics on test, per mode."""
    thresholds_from = "validate" if len(parts["validate"]["y"]) else "default_0.5"
    result = {"n_test": int(len(parts["test"]["y"])), "n_validate": int(len(parts["validate"]["y"])),
              "label_names": names, "thresholds_from": thresholds_from}
    for mode in MODES:
        thresholds = choose_thresholds(parts["validate"][mode], parts["validate"]["y"])
        result[mode] = multilabel_metrics(parts["test"][mode], parts["test"]["y"], names, thresholds)
    return result


def calibration_summary(test: dict, names: list[str], meta: dict) -> dict:
    """Test ECE per mode (macro over labels, and per label) before and after the bundle's
    temperature scaling; ``fitted`` False for a bundle without one (before = after)."""
    from medfuse_core.evaluation.calibration import ece_per_label, macro

    out = {"fitted": bool((meta.get("extra") or {}).get("calibration"))}
    for mode in MODES:
        before = ece_per_label(test[f"{mode}_raw"], test["y"], names)
        after = ece_per_label(test[mode], test["y"], names)
        out[mode] = {"ece_macro_before": macro(before), "ece_macro_after": macro(after),
                     "ece_before": before, "ece_after": after}
    return out


def run(model_ref: str, data_dir: str | Path, out: str | Path, log_images: bool = False,
        prompts: str | None = None, overrides=()) -> dict:
    """Evaluate and write the metrics JSON; returns it.

    ``log_images`` (off by default) also logs patient images (attention maps over a few test
    images) to the model's MLflow run; without it no such figure is made. ``overrides``
    (``decoding.KEY=VALUE``) change a report model's decoding settings.
    """
    import mlflow

    from medfuse_core.models.bundle import read_bundle_meta
    from pipelines import plots
    from pipelines.runtime import init_ray

    data_dir = Path(data_dir)
    summary = load_summary(data_dir)
    if not has_split(data_dir, "test"):
        raise SourceError("--data: the test split is empty")
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir, facts = resolve_model(model_ref, Path(tmp))
        meta = read_bundle_meta(bundle_dir)
        if meta.get("kind") == "contrastive":  # a stage-1 model: zero-shot and retrieval
            from pipelines import evaluate_pretrained

            init_ray()
            return evaluate_pretrained.run(bundle_dir, facts, model_ref, data_dir, summary, Path(out), prompts)
        if meta.get("kind") == "report":  # drafts scored under report_generation
            from medfuse_core.evaluation.report_inference import decoding_settings
            from medfuse_core.models.bundle import load_bundle
            from pipelines import evaluate_report

            decoding_settings(load_bundle(bundle_dir), overrides)  # a bad override fails before any work
            init_ray()
            return evaluate_report.run(bundle_dir, facts, model_ref, data_dir, summary, Path(out), overrides)
        if overrides:
            raise SourceError(f"{overrides[0]}: settings apply to a report model only")
        names = meta["label_names"]
        blank_policy = (meta.get("extra") or {}).get("blank_policy", "negative")
        init_ray()
        parts = score_splits(bundle_dir, data_dir, blank_policy)
        if len(parts["test"]["y"]) == 0:
            raise SourceError("--data: the test split has no labelled rows")
        if len(parts["validate"]["y"]) == 0:
            log.warning("--data: no labelled validate rows; decision thresholds fall back to 0.5 for every label "
                        "(F1 is not tuned; AUROC/AUPRC are unaffected)")
        run_id = facts.get("mlflow_run_id")
        figure = None
        cam = None
        if log_images and run_id:
            figure = attention_figure(bundle_dir, data_dir, _scorable(parts, names))
            cam = grad_cam_figure(bundle_dir, data_dir, _scorable(parts, names))
        elif log_images:
            log.warning("--log-images: %s has no MLflow run to log images to; none logged", model_ref)
    result = {"model": model_ref, "data_digest": summary.get("digest"), "blank_policy": blank_policy,
              **metrics_from_scores(parts, names), "calibration": calibration_summary(parts["test"], names, meta)}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    if run_id:
        if facts.get("tracking_uri"):
            mlflow.set_tracking_uri(facts["tracking_uri"])
        with mlflow.start_run(run_id=run_id):
            tracking.log_dataset(summary, data_dir, context="evaluation", splits=EVAL_SPLITS)
            mlflow.log_metrics({f"test/{mode}/{key}": result[mode][key]
                                for mode in MODES for key in ("auroc_macro", "auprc_macro", "f1_macro")})
            for mode in MODES:
                for name, value in result[mode]["auroc"].items():
                    mlflow.log_metric(f"test/{mode}/auroc/{name.replace(' ', '_')}", value)
            mlflow.log_dict(result, "evaluation/metrics.json")
            mlflow.set_tag("mlflow.note.content", _run_note(result))
            y = parts["test"]["y"]
            mlflow.log_figure(plots.roc_curves({m: parts["test"][m] for m in MODES}, y, names),
                              "evaluation/roc_curves.png")
            mlflow.log_figure(plots.per_label_auroc({m: result[m] for m in MODES}, names),
                              "evaluation/per_label_auroc.png")
            cal = result["calibration"]
            mlflow.log_metrics({f"test/{mode}/ece_macro_{when}": cal[mode][f"ece_macro_{when}"]
                                for mode in MODES for when in ("before", "after")
                                if cal[mode][f"ece_macro_{when}"] == cal[mode][f"ece_macro_{when}"]})
            for mode in MODES:
                mlflow.log_figure(plots.reliability_before_after(parts["test"][f"{mode}_raw"], parts["test"][mode], y,
                                                                 names, mode),
                                  f"evaluation/reliability_{mode}.png")
            if figure is not None:
                mlflow.log_figure(figure, "evaluation/attention_maps.png")
            if cam is not None:
                mlflow.log_figure(cam, "evaluation/grad_cam.png")
    return result
