"""Score the test split: image-only and image + clinical context, with thresholds from validation.

``--model`` may be a finetune workdir, a bundle folder, an MLflow run id, or a model URI
(``runs:/<id>/model``, ``models:/<name>@candidate``). Metrics go to ``--out`` and, when the
model came from an MLflow run, to that run (test/ metrics, ROC, per-label and calibration plots).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from medfuse_core.metrics import choose_thresholds, multilabel_metrics
from pipelines import tracking
from medfuse_core.sources import SourceError
from pipelines.ingest import SHARDS_DIR, load_summary

log = logging.getLogger("medfuse")

MODES = ("image_only", "image_text")


class _Scorer:
    """Ray Data callable class: loads the bundle once per actor, scores batches."""

    def __init__(self, bundle_dir: str):
        import torch

        from medfuse_core.labels import evaluation_targets
        from medfuse_core.models.bundle import load_bundle
        from medfuse_core.batching import label_indices

        torch.set_num_threads(1)
        self.bundle = load_bundle(bundle_dir)
        self.idx = label_indices(self.bundle.label_names)
        self._eval_targets = evaluation_targets

    def __call__(self, rows: dict) -> dict:
        from medfuse_core.inference import score_rows

        scores = score_rows(self.bundle, rows)
        raw = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])[:, self.idx]
        return {
            "split": rows["split"],
            "y": list(self._eval_targets(raw)),
            "image_only": list(scores["image_only"]),
            "image_text": list(scores["image_text"]),
        }


def resolve_model(ref: str, tmp: Path) -> tuple[Path, dict]:
    """Find the bundle folder for ``ref``; also return tracking facts (run id, store) when known."""
    path = Path(ref)
    if path.is_dir():
        if (path / "finetune.json").is_file():
            facts = json.loads((path / "finetune.json").read_text())
            return path / "model", facts
        if (path / "medfuse_model.json").is_file():
            return path, {}
        raise FileNotFoundError(f"--model: {ref} is neither a finetune workdir nor a model bundle")
    uri = ref if re.match(r"^[a-z]+:/", ref) else f"runs:/{ref}/model"
    bundle = tracking.bundle_dir_from_model_uri(uri, tmp)
    facts = {}
    m = re.match(r"^runs:/([0-9a-f]+)/", uri)
    if m:
        facts["mlflow_run_id"] = m.group(1)
    return bundle, facts


def attention_figure(bundle_dir: Path, data_dir: Path, scored_labels=None, n: int = 6):
    """Text-to-image attention over a few test images that have clinical context; None if the
    fusion module exposes no such map (concat, gated). Titles name the top predictions among
    ``scored_labels`` (labels without training signal are left out)."""
    import pyarrow.parquet as pq
    import torch

    from medfuse_core.batching import blobs_to_images, images_to_tensor, tokenize
    from medfuse_core.models.bundle import load_bundle
    from pipelines import plots

    bundle = load_bundle(bundle_dir)
    table = pq.read_table(data_dir / SHARDS_DIR, columns=["split", "image", "image_size", "context"])
    rows = table.to_pandas()
    rows = rows[(rows["split"] == "test") & (rows["context"].str.strip() != "")].head(n)
    if rows.empty:
        return None
    images = blobs_to_images(list(rows["image"]), list(rows["image_size"]))
    tok = tokenize(bundle.tokenizer, list(rows["context"]), bundle.model_config.text.max_tokens)
    with torch.no_grad():
        out = bundle.model(images_to_tensor(images, bundle.image_size), **tok)
    att = out["attention"].get("text_to_image")
    if att is None:
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


def _run_note(result: dict) -> str:
    """A short Markdown description for the MLflow run page."""
    lines = [f"**Test split**: {result['n_test']} images. Thresholds chosen on the validation split.", "",
             "| scoring | macro AUROC | macro AUPRC | macro F1 |", "|---|---|---|---|"]
    for mode in MODES:
        m = result[mode]
        lines.append(f"| {mode} | {m['auroc_macro']:.3f} | {m['auprc_macro']:.3f} | {m['f1_macro']:.3f} |")
    lines += ["", "`image_text` sees the clinical context (indication) only, never findings or impression.",
              "Plots: `evaluation/roc_curves.png`, `evaluation/per_label_auroc.png`, "
              "`evaluation/calibration_image_text.png`."]
    return "\n".join(lines)


def run(model_ref: str, data_dir: str | Path, out: str | Path) -> dict:
    """Evaluate and write the metrics JSON; returns it."""
    import mlflow
    import ray

    from medfuse_core.models.bundle import read_bundle_meta
    from pipelines import plots
    from pipelines.runtime import init_ray

    data_dir = Path(data_dir)
    load_summary(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir, facts = resolve_model(model_ref, Path(tmp))
        meta = read_bundle_meta(bundle_dir)
        names = meta["label_names"]
        init_ray()
        ds = ray.data.read_parquet(str(data_dir / SHARDS_DIR)).filter(expr="split != 'train'")
        scored = ds.map_batches(_Scorer, fn_constructor_kwargs={"bundle_dir": str(bundle_dir)}, batch_size=64,
                                compute=ray.data.ActorPoolStrategy(size=1), batch_format="numpy").to_pandas()
        figure = None
        # the maps show patient images: only into a store on this machine, never a shared server
        if facts.get("mlflow_run_id") and tracking.is_local_store(facts.get("tracking_uri") or mlflow.get_tracking_uri()):
            y_all = np.stack(scored["y"].to_numpy())
            scorable = [n for j, n in enumerate(names)
                        if 0 < np.nansum(y_all[:, j]) < np.sum(~np.isnan(y_all[:, j]))]  # both classes seen
            figure = attention_figure(bundle_dir, data_dir, scorable)
    parts = {}
    for split in ("validate", "test"):
        sub = scored[scored["split"] == split]
        parts[split] = {k: np.stack(sub[k].to_numpy()) if len(sub) else np.zeros((0, len(names)))
                        for k in ("y",) + MODES}
    if len(parts["test"]["y"]) == 0:
        raise SourceError("--data: the test split is empty")
    result = {"model": model_ref, "n_test": int(len(parts["test"]["y"])), "label_names": names}
    for mode in MODES:
        thresholds = choose_thresholds(parts["validate"][mode], parts["validate"]["y"])
        result[mode] = multilabel_metrics(parts["test"][mode], parts["test"]["y"], names, thresholds)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))

    run_id = facts.get("mlflow_run_id")
    if run_id:
        if facts.get("tracking_uri"):
            mlflow.set_tracking_uri(facts["tracking_uri"])
        with mlflow.start_run(run_id=run_id):
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
            mlflow.log_figure(plots.calibration(parts["test"]["image_text"], y, names, "Calibration (image + text)"),
                              "evaluation/calibration_image_text.png")
            if figure is not None:
                mlflow.log_figure(figure, "evaluation/attention_maps.png")
    return result
