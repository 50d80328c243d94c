"""``medfuse evaluate`` on a stage-1 (contrastive) model: zero-shot classification and
image-report retrieval on the test split.

The test split's images and reports are embedded in a Ray Data actor pool (only the
embeddings, targets and a digest of each report come back to the driver: ``[N, D]`` floats,
no pixels and no text); prompts come from an editable YAML file.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from medfuse_core.data.sources import SourceError
from pipelines import tracking
from pipelines.shards import has_split, read_split

log = logging.getLogger("medfuse")

COLUMNS = ["image", "image_size", "report", "labels", "labelled"]
BATCH_SIZE = 64


class _Embedder:
    """Ray Data callable class: loads the bundle once per actor, embeds image-report batches."""

    def __init__(self, bundle_dir: str, threads: int = 1):
        import torch

        from medfuse_core.models.bundle import load_bundle

        torch.set_num_threads(max(1, int(threads)))
        self.bundle = load_bundle(bundle_dir)
        extra = self.bundle.extra
        self.sections = tuple(extra.get("text_sections", ("findings", "impression")))
        self.blank_policy = extra.get("blank_policy", "negative")

    def __call__(self, rows: dict) -> dict:
        from medfuse_core.data.batching import blobs_to_images
        from medfuse_core.data.labels import evaluation_targets
        from medfuse_core.evaluation.embeddings import embed_images, embed_texts
        from medfuse_core.objectives.alignment import report_text, text_key

        texts = [report_text(r if isinstance(r, str) else "", self.sections) for r in rows["report"]]
        raw = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])
        y = evaluation_targets(raw, blank_policy=self.blank_policy)
        y[~np.asarray(rows["labelled"], dtype=bool)] = np.nan
        return {"image": embed_images(self.bundle, blobs_to_images(rows["image"], rows["image_size"])),
                "text": embed_texts(self.bundle, texts), "y": y.astype(np.float32),
                "key": np.asarray([text_key(t) for t in texts])}


def embed_split(bundle_dir: Path, data_dir: Path, split: str) -> dict[str, np.ndarray]:
    """``{"image", "text": [N, D], "y": [N, 14] (NaN = not scored), "key": [N]}`` for one split."""
    import ray

    from pipelines.runtime import scorer_resources

    res = scorer_resources(ray.cluster_resources())
    out = {k: [] for k in ("image", "text", "y", "key")}
    ds = read_split(data_dir, split, COLUMNS).map_batches(
        _Embedder, batch_size=BATCH_SIZE, batch_format="numpy",
        fn_constructor_kwargs={"bundle_dir": str(bundle_dir), "threads": res["threads"]},
        compute=ray.data.ActorPoolStrategy(min_size=res["min_size"], max_size=res["max_size"]),
        num_cpus=res["num_cpus"], num_gpus=res["num_gpus"])
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for k in out:
            out[k].append(np.asarray(batch[k]))
    return {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in out.items()}


def score(parts: dict, bundle, prompts_path: Path, label_names: list[str], per_image: bool = False) -> dict:
    """Zero-shot per-label AUROC and retrieval recall from the embedded split; ``per_image`` also
    returns the zero-shot ``scores`` (label -> [N]) and their targets ``y`` ([N, L] in ``label_names``' order,
    NaN = not scored)
    under ``"per_image"`` (for confidence intervals; not JSON)."""
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.embeddings import embed_texts
    from medfuse_core.evaluation.retrieval import recall_at_k
    from medfuse_core.evaluation.zero_shot import load_prompts, prompt_embeddings, zero_shot_metrics, zero_shot_scores

    prompts = {k: v for k, v in load_prompts(prompts_path).items() if k in label_names}
    pos, neg = prompt_embeddings(prompts, lambda texts: embed_texts(bundle, texts))
    scale = float(bundle.model.logit_scale().detach())
    scores = zero_shot_scores(parts["image"], pos, neg, scale=scale)
    y = parts["y"][:, [CHEXPERT_LABELS.index(n) for n in label_names]]
    zs = zero_shot_metrics(scores, y, label_names)
    retrieval = recall_at_k(parts["image"], parts["text"], text_keys=list(parts["key"]))
    out = {"zero_shot": {"auroc": zs["auroc"], "auroc_macro": zs["auroc_macro"], "n": zs["n"],
                         "skipped": zs["skipped"], "prompts": str(prompts_path), "logit_scale": scale},
           "retrieval": {"image_to_text": retrieval["image_to_text"], "text_to_image": retrieval["text_to_image"],
                         "n": retrieval["n"], "duplicates_count_as_hits": True}}
    if per_image:
        out["per_image"] = {"scores": scores, "y": y}
    return out


def run(bundle_dir: Path, facts: dict, model_ref: str, data_dir: Path, summary: dict, out: Path,
        prompts: str | None = None, labels: list[str] | None = None) -> dict:
    """Embed the test split, score zero-shot and retrieval, write ``out`` and log to the model's run."""
    import mlflow

    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.zero_shot import default_prompts_path
    from medfuse_core.models.bundle import load_bundle
    from pipelines import plots

    if not has_split(data_dir, "test"):
        raise SourceError("--data: the test split is empty")
    prompts_path = Path(prompts) if prompts else default_prompts_path()
    label_names = list(labels or CHEXPERT_LABELS)
    parts = embed_split(bundle_dir, data_dir, "test")
    if len(parts["image"]) < 2:
        raise SourceError("--data: the test split needs at least 2 images to score retrieval")
    bundle = load_bundle(bundle_dir)
    result = {"model": model_ref, "kind": "contrastive", "data_digest": summary.get("digest"),
              "n_test": int(len(parts["image"])), **score(parts, bundle, prompts_path, label_names)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    run_id = facts.get("mlflow_run_id")
    if run_id:
        if facts.get("tracking_uri"):
            mlflow.set_tracking_uri(facts["tracking_uri"])
        with mlflow.start_run(run_id=run_id):
            tracking.log_dataset(summary, data_dir, context="evaluation", splits=("test",))
            metrics = {"test/zero_shot/auroc_macro": result["zero_shot"]["auroc_macro"]}
            for name, value in result["zero_shot"]["auroc"].items():
                metrics[f"test/zero_shot/auroc/{name.replace(' ', '_')}"] = value
            for direction in ("image_to_text", "text_to_image"):
                for k, v in result["retrieval"][direction].items():
                    metrics[f"test/retrieval/{direction}/{k.replace('@', '_at_')}"] = v
            mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
            mlflow.log_dict(result, "evaluation/zero_shot_retrieval.json")
            mlflow.log_figure(plots.per_label_auroc({"zero_shot": result["zero_shot"]}, label_names),
                              "evaluation/zero_shot_auroc.png")
    return result
