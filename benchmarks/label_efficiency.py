"""Label efficiency on data medfuse did not tune on: fine-tuning from stage-1 pretraining vs from scratch.

One command::

    python benchmarks/label_efficiency.py --out benchmarks/results/label_efficiency.json

On a corpus from the independent generator (``benchmarks/indep_corpus.py``, made and ingested
by ``time_to_quality.prepare``, cached under ``--data-work``), in one process with one local Ray:

1. **pretrain once**: ``pipelines.pretrain.run`` with ``--pretrain-config`` (default
   ``experiments/pretrain_cxr_cpu.yaml``) on every training image and its report's
   FINDINGS + IMPRESSION (labels unused). The pretrained model is scored with
   ``pipelines.evaluate.run`` (zero-shot AUROC and image/report retrieval on the test split,
   logged to the pretraining run), and the same scorer on the validate split; the zero-shot
   figure quoted here is the macro AUROC over the findings the generator draws
   (``time_to_quality.DRAWN``, those with both classes in the split). The workdir is named
   after a digest of the resolved pretraining config, so the same settings are reused.
2. **fine-tune** ``pipelines.finetune.run`` with ``--finetune-config`` (default
   ``experiments/finetune_cxr_cpu.yaml``) for every label fraction (``--fractions``, default
   0.01 0.1 1.0: ``data.label_fraction``, a seeded patient-level share of the labelled training
   images) x seed (``--seeds``, default 0 1 2: ``train.seed``, which also picks the fraction) x
   init (``pretrained``: ``init_from=<the pretraining workdir>``; ``scratch``: no init_from).
   When a fraction holds too few images for ``scaling.num_workers x train.batch_size x 2``
   (two steps per epoch), ``train.batch_size`` is lowered to fit (at least 2); the batch used is
   recorded per cell. ``--min-steps`` raises a cell's ``train.epochs`` so that a small fraction
   still takes that many optimizer steps (up to ``--max-epochs``). The best checkpoint (by the
   config's validation score) is scored with ``pipelines.evaluate.score_splits`` on validate and
   test: macro AUROC over the drawn findings (``time_to_quality.macro_auroc``), image-only and image + clinical context.
   With ``--holdout-studies N`` every model (the pretrained one's zero-shot, and each fine-tuned
   cell) is also scored on every image of a held-out corpus (N studies of the same generator,
   ``--holdout-seed``, all splits pooled): thousands of images that nothing was chosen on, where
   a test split of about a hundred images leaves 0.02-0.03 of noise. The pretrained model's
   held-out zero-shot macro also gets a 95% interval (1000 image-level bootstrap resamples).
3. **MLflow**: one parent run ``label-efficiency`` in the embedded store under ``--work``
   (experiment ``medfuse-label-efficiency``) with a child run per (fraction, seed, init) (params,
   validate/test metrics, the fine-tuning run's id and store); the parent gets the pretrained
   model's figures, the results table (``results_table.json``, ``results.csv``) and the plot
   (``label_efficiency.png``: label fraction on a log axis, macro AUROC on the held-out corpus
   when there is one, else on test, mean with min-max bars, pretrained vs scratch, one panel per
   scoring mode).

Overrides: ``pretrain.KEY=VALUE`` and ``finetune.KEY=VALUE`` (positional), e.g.
``pretrain.train.epochs=6 finetune.train.epochs=8``. Settings are chosen on validate only;
test is reported. Results go to ``--out`` (JSON) and a Markdown table is printed. Resumable: a
cell whose result (same settings) is already in ``--out`` is skipped, and the scratch cells are
kept when only the pretraining settings change; ``--pretrain-only`` stops
after step 1. Fine-tuning checkpoints (``W/ray``) are deleted once a cell is scored unless
``--keep-checkpoints``. It asserts nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from time_to_quality import DRAWN, macro_auroc, prepare, resample_interval  # noqa: E402

INITS = ("pretrained", "scratch")
MODES = ("image_only", "image_text")
SPLITS = ("validate", "test", "holdout")  # holdout: every image of a held-out corpus (--holdout-studies)
EXPERIMENT = "medfuse-label-efficiency"
MIN_STEPS_PER_EPOCH = 2
MIN_BATCH = 2


def say(msg: str) -> None:
    print(f"[label-efficiency] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def digest(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:10]


def split_overrides(items: list[str]) -> tuple[list[str], list[str]]:
    pre, fine = [], []
    for item in items:
        head, _, rest = item.partition(".")
        if head == "pretrain" and rest:
            pre.append(rest)
        elif head == "finetune" and rest:
            fine.append(rest)
        else:
            raise SystemExit(f"override {item!r}: prefix it with pretrain. or finetune.")
    return pre, fine


def start_ray(attempts: int = 3) -> None:
    """One local Ray for every stage; its start-up is retried (it times out on an overloaded machine)."""
    import ray

    from pipelines.runtime import init_ray

    for i in range(attempts):
        try:
            init_ray(num_cpus=os.cpu_count())
            return
        except Exception as exc:  # noqa: BLE001 - "node timed out during startup" under load
            say(f"ray start-up failed ({exc}); retry {i + 1}/{attempts - 1}" if i + 1 < attempts else "ray start-up failed")
            ray.shutdown()
            if i + 1 == attempts:
                raise
            time.sleep(5)


def _drawn_macro(per_label: dict) -> float:
    vals = [v for k, v in per_label.items() if k in DRAWN and v == v]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def epoch_history(tracking_uri: str, run_id: str) -> list[dict]:
    """Per epoch of a pretraining run: retrieval score, zero-shot macro (all / drawn), train seconds."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    hist = {}
    for key in run.data.metrics:
        if key in ("val/retrieval_mean_recall", "val/zero_shot_auroc_macro", "perf/epoch_train_seconds") or \
                key.startswith("val/zero_shot_auroc/"):
            for m in client.get_metric_history(run_id, key):
                hist.setdefault(m.step, {})[key] = m.value
    out = []
    for i, step in enumerate(sorted(hist)):
        h = hist[step]
        per = {k.split("/", 2)[2].replace("_", " "): v for k, v in h.items() if k.startswith("val/zero_shot_auroc/")}
        out.append({"epoch": i, "step": step, "retrieval_mean_recall": h.get("val/retrieval_mean_recall"),
                    "zero_shot_auroc_macro_all": h.get("val/zero_shot_auroc_macro"),
                    "zero_shot_auroc_macro_drawn": _drawn_macro(per),
                    "train_seconds": h.get("perf/epoch_train_seconds")})
    return out


def embed_pooled(bundle_dir: Path, data: Path) -> dict:
    """Every split of ``data`` embedded by a stage-1 bundle, pooled into one set of parts."""
    import numpy as np

    from pipelines import evaluate_pretrained
    from pipelines.shards import has_split

    parts = [evaluate_pretrained.embed_split(bundle_dir, data, s) for s in ("train", "validate", "test")
             if has_split(data, s)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def zero_shot_summary(r: dict) -> dict:
    """The figures kept of one :func:`pipelines.evaluate_pretrained.score` result."""
    return {"zero_shot_auroc_macro_drawn": _drawn_macro(r["zero_shot"]["auroc"]),
            "zero_shot_auroc_macro_all": r["zero_shot"]["auroc_macro"],
            "zero_shot_auroc": r["zero_shot"]["auroc"], "n": r["zero_shot"]["n"],
            "retrieval": {"image_to_text": r["retrieval"]["image_to_text"],
                          "text_to_image": r["retrieval"]["text_to_image"], "n": r["retrieval"]["n"]}}


def holdout_zero_shot(pre: dict, holdout: Path) -> dict:
    """Zero-shot and retrieval of the pretrained model on every image of a held-out corpus."""
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.zero_shot import default_prompts_path
    from medfuse_core.models.bundle import load_bundle
    from pipelines import evaluate_pretrained

    bundle_dir = Path(pre["workdir"]) / "model"
    parts = embed_pooled(bundle_dir, holdout)
    r = evaluate_pretrained.score(parts, load_bundle(bundle_dir), default_prompts_path(), list(CHEXPERT_LABELS),
                                  per_image=True)
    ci = bootstrap_drawn_macro(r["per_image"]["scores"], r["per_image"]["y"], list(CHEXPERT_LABELS))
    return {"corpus": str(holdout), **zero_shot_summary(r), "zero_shot_auroc_macro_drawn_ci95": ci,
            "ci": "2.5/97.5 percentiles of 1000 image-level bootstrap resamples"}


def bootstrap_drawn_macro(scores: dict, y, labels: list[str], resamples: int = 1000, seed: int = 0) -> list[float]:
    """95% interval of the zero-shot macro AUROC over the drawn findings, resampling images (the
    embedded parts carry no patient ids)."""
    import numpy as np

    from medfuse_core.evaluation.zero_shot import zero_shot_metrics

    def drawn(idx):
        return _drawn_macro(zero_shot_metrics({k: v[idx] for k, v in scores.items()}, y[idx], labels)["auroc"])

    return resample_interval(drawn, [np.array([i]) for i in range(len(y))], resamples, seed)


def pretrain_stage(data: Path, work: Path, config: Path, overrides: list[str]) -> dict:
    """Pretrain (or reuse the same settings' run) and score zero-shot / retrieval on validate and test."""
    from medfuse_core.config import PretrainConfig
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.zero_shot import default_prompts_path
    from medfuse_core.experiment import load_config
    from medfuse_core.models.bundle import load_bundle
    from pipelines import evaluate, evaluate_pretrained, pretrain

    cfg = load_config(config, overrides, schema=PretrainConfig)
    workdir = work / f"pretrain-{digest([cfg.model_dump(), str(data.resolve())])}"
    cached = workdir / "label_efficiency_pretrain.json"
    if cached.exists():
        result = json.loads(cached.read_text())
        say(f"pretrain: reusing {workdir}")
        return result
    say(f"pretrain: {config.name} {' '.join(overrides)} -> {workdir}")
    t0 = time.perf_counter()
    facts = pretrain.run(cfg, data, workdir)
    wall = time.perf_counter() - t0
    say(f"pretrain: done in {wall:.0f} s, best epoch {facts['best_epoch']}, "
        f"{facts['score_key']} {facts['best_score']:.3f}")
    history = epoch_history(facts["tracking_uri"], facts["mlflow_run_id"])
    t0 = time.perf_counter()
    test = evaluate.run(str(workdir), data, workdir / "zero_shot_retrieval_test.json")
    # the same scorer on validate (settings are chosen here), not logged anywhere
    bundle_dir = workdir / "model"
    parts = evaluate_pretrained.embed_split(bundle_dir, data, "validate")
    val = evaluate_pretrained.score(parts, load_bundle(bundle_dir), default_prompts_path(), list(CHEXPERT_LABELS))
    result = {"config": str(config), "overrides": overrides, "workdir": str(workdir), "wall_seconds": wall,
              "train_seconds": float(sum(h["train_seconds"] or 0 for h in history)),
              "eval_wall_seconds": time.perf_counter() - t0, "best_epoch": facts["best_epoch"],
              "best_val_retrieval_mean_recall": facts["best_score"], "mlflow_run_id": facts["mlflow_run_id"],
              "tracking_uri": facts["tracking_uri"], "history": history,
              "settings": {"objective": cfg.objective.name, "image_size": cfg.data.image_size,
                           "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size, "lr": cfg.train.lr,
                           "text_lr": cfg.train.text_lr, "text_trainable_layers": cfg.model.text.trainable_layers,
                           "num_workers": cfg.scaling.num_workers}}
    for split, r in (("validate", val), ("test", test)):
        result[split] = zero_shot_summary(r)
    cached.write_text(json.dumps(result, indent=2))
    return result


def fit_batch(n_train: int, batch: int, workers: int) -> int:
    """The configured batch, lowered so that every worker gets MIN_STEPS_PER_EPOCH steps (at least MIN_BATCH)."""
    if n_train >= workers * batch * MIN_STEPS_PER_EPOCH:
        return batch
    return max(MIN_BATCH, n_train // (workers * MIN_STEPS_PER_EPOCH))


def fit_epochs(n_train: int, batch: int, workers: int, epochs: int, min_steps: int, max_epochs: int) -> int:
    """The configured epochs, raised so a small fraction still takes ``min_steps`` optimizer steps (capped)."""
    per_epoch = max(1, n_train // (workers * batch))
    return max(epochs, min(max_epochs, -(-min_steps // per_epoch)))


def finetune_cell(data: Path, work: Path, config: Path, overrides: list[str], fraction: float, seed: int,
                  init: str, pretrain_dir: str | None, keep_checkpoints: bool, min_steps: int = 0,
                  max_epochs: int = 0, holdout: Path | None = None) -> dict:
    """One fine-tuning run and its validate/test macro AUROC over the drawn findings."""
    import mlflow
    import numpy as np

    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.experiment import load_config
    from pipelines import evaluate, finetune
    from pipelines.shards import count_fraction

    base = load_config(config, overrides)
    summary = json.loads((data / "ingest_summary.json").read_text())
    if fraction < 1.0:
        n = count_fraction(data, "train", fraction, seed)["images"]
    else:
        n = summary.get("labelled_images_per_split", summary["splits"]).get("train", 0)
    batch = fit_batch(n, base.train.batch_size, base.scaling.num_workers)
    epochs = fit_epochs(n, batch, base.scaling.num_workers, base.train.epochs, min_steps, max(max_epochs, base.train.epochs))
    cell_overrides = [*overrides, f"data.label_fraction={fraction}", f"train.seed={seed}", f"train.batch_size={batch}",
                      f"train.epochs={epochs}"]
    if init == "pretrained":
        cell_overrides.append(f"init_from={pretrain_dir}")
    cfg = load_config(config, cell_overrides)
    workdir = work / f"finetune-{digest([cfg.model_dump(), str(data.resolve())])}"
    say(f"cell fraction={fraction} seed={seed} init={init}: {n} labelled images, batch {batch} -> {workdir.name}")
    t0 = time.perf_counter()
    facts = finetune.run(cfg, data, workdir)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(facts["tracking_uri"])
    hist = client.get_metric_history(facts["mlflow_run_id"], "perf/epoch_train_seconds")
    scores = evaluate.score_splits(facts["model_dir"], data, blank_policy=cfg.data.blank_policy)
    names = list(cfg.data.labels)
    out = {"fraction": fraction, "seed": seed, "init": init, "n_train": n, "batch_size": batch,
           "epochs": cfg.train.epochs, "overrides": cell_overrides, "workdir": str(workdir),
           "finetune_wall_seconds": wall, "train_seconds": float(sum(m.value for m in hist)),
           "best_epoch": facts["best_epoch"], "best_val_score": facts.get("best_score"),
           "mlflow_run_id": facts["mlflow_run_id"], "tracking_uri": facts["tracking_uri"]}
    if holdout is not None:  # every image of the held-out corpus, pooled
        held = evaluate.score_splits(facts["model_dir"], holdout, blank_policy=cfg.data.blank_policy,
                                     splits=("train", "validate", "test"))
        scores["holdout"] = {k: np.concatenate([held[s][k] for s in held]) for k in held["test"]}
    for split in scores:
        raw = np.full((len(scores[split]["y"]), len(CHEXPERT_LABELS)), np.nan, np.float32)
        for j, name in enumerate(names):
            raw[:, CHEXPERT_LABELS.index(name)] = scores[split]["y"][:, j]
        for mode in MODES:
            probs = np.full_like(raw, np.nan)
            for j, name in enumerate(names):
                probs[:, CHEXPERT_LABELS.index(name)] = scores[split][mode][:, j]
            out[f"{split}_{mode}"], out[f"{split}_{mode}_per_label"] = macro_auroc(probs, raw, DRAWN)
    if not keep_checkpoints:  # the bundle in W/model and the MLflow store stay
        for sub in ("ray", "init_from"):
            shutil.rmtree(workdir / sub, ignore_errors=True)
    return out


def cell_key(fraction: float, seed: int, init: str) -> str:
    return f"f{fraction:g}/s{seed}/{init}"


def aggregate(cells: dict) -> list[dict]:
    """Per (fraction, init): mean, min, max, std over seeds, validate and test, both modes."""
    groups: dict = {}
    for c in cells.values():
        groups.setdefault((c["fraction"], c["init"]), []).append(c)
    rows = []
    for (fraction, init), cs in sorted(groups.items()):
        row = {"fraction": fraction, "init": init, "n_seeds": len(cs), "seeds": sorted(c["seed"] for c in cs),
               "n_train_mean": statistics.mean(c["n_train"] for c in cs)}
        for split in SPLITS:
            if not all(f"{split}_image_only" in c for c in cs):
                continue
            for mode in MODES:
                v = [c[f"{split}_{mode}"] for c in cs]
                row[f"{split}_{mode}"] = {"mean": statistics.mean(v), "min": min(v), "max": max(v),
                                          "std": statistics.stdev(v) if len(v) > 1 else 0.0}
        rows.append(row)
    return rows


def deltas(cells: dict) -> list[dict]:
    """Pretrained minus scratch, paired by (fraction, seed): mean, min, max."""
    out, by = [], {}
    for c in cells.values():
        by.setdefault((c["fraction"], c["seed"]), {})[c["init"]] = c
    fractions = sorted({f for f, _ in by})
    for f in fractions:
        pairs = [v for (ff, _), v in by.items() if ff == f and len(v) == 2]
        if not pairs:
            continue
        row = {"fraction": f, "n_pairs": len(pairs)}
        for split in SPLITS:
            if not all(f"{split}_image_only" in c for p in pairs for c in p.values()):
                continue
            for mode in MODES:
                d = [p["pretrained"][f"{split}_{mode}"] - p["scratch"][f"{split}_{mode}"] for p in pairs]
                row[f"{split}_{mode}"] = {"mean": statistics.mean(d), "min": min(d), "max": max(d)}
        out.append(row)
    return out


def plot(rows: list[dict], pre: dict | None):
    """Macro AUROC against label fraction, pretrained vs scratch; on the held-out corpus when every
    row has it, else on the test split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = "holdout" if rows and all("holdout_image_only" in r for r in rows) else "test"
    where = {"holdout": "held-out corpus (every image)", "test": "test split"}[split]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, mode in zip(axes, MODES):
        for init, color, dx in (("pretrained", "tab:blue", 1.04), ("scratch", "tab:orange", 1 / 1.04)):
            rs = [r for r in rows if r["init"] == init]
            if not rs:
                continue
            x = [r["fraction"] * dx for r in rs]
            m = [r[f"{split}_{mode}"]["mean"] for r in rs]
            lo = [r[f"{split}_{mode}"]["mean"] - r[f"{split}_{mode}"]["min"] for r in rs]
            hi = [r[f"{split}_{mode}"]["max"] - r[f"{split}_{mode}"]["mean"] for r in rs]
            ax.errorbar(x, m, yerr=[lo, hi], marker="o", capsize=4, color=color,
                        label=f"{init} (mean, min-max over seeds)")
            for xi, mi, r in zip(x, m, rs):  # how many seeds each point averages
                ax.annotate(f"n={r['n_seeds']}", (xi, mi), textcoords="offset points",
                            xytext=(6, -12 if init == "scratch" else 6), fontsize=7, color=color)
        if pre is not None and mode == "image_only":
            ax.axhline(pre[split]["zero_shot_auroc_macro_drawn"] if split in pre
                       else pre["test"]["zero_shot_auroc_macro_drawn"], ls="--", color="tab:green",
                       label="zero-shot (pretrained, no labels)")
        ax.set_xscale("log")
        fr = sorted({r["fraction"] for r in rows})
        ax.set_xlim(fr[0] / 2, fr[-1] * 2)
        ax.set_xticks(fr, [f"{f:g}" for f in fr])
        ax.minorticks_off()
        ax.margins(y=0.1)
        ax.set_xlabel("label fraction of the training images")
        ax.set_title({"image_only": "image only", "image_text": "image + clinical context"}[mode])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8, loc="best")
    axes[0].set_ylabel(f"macro AUROC (drawn findings)\n{where}")
    fig.suptitle("Label efficiency on the independent corpus: fine-tuning from pretraining vs from scratch")
    fig.tight_layout()
    return fig


def log_mlflow(work: Path, result: dict, new_cells: list[str]) -> str:
    """The parent run (created once, reused on resume), a child run per new cell, table and plot on the parent."""
    import mlflow
    import pandas as pd

    from pipelines import tracking

    uri = tracking.tracking_uri(work)
    exp_id = tracking.setup(work, EXPERIMENT)
    client = mlflow.MlflowClient(uri)
    parent = result.get("mlflow", {}).get("parent_run_id")
    try:
        client.get_run(parent) if parent else None
    except Exception:  # noqa: BLE001 - a deleted store: start a new parent
        parent = None
    if not parent:
        run = client.create_run(exp_id, run_name="label-efficiency", tags={"medfuse.stage": "benchmark"})
        parent = run.info.run_id
        new_cells = list(result["cells"])
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    pre = result.get("pretrain")
    params = {"corpus.generator": "benchmarks/indep_corpus.py", **{f"corpus.{k}": v for k, v in result["corpus"].items()
                                                                     if k != "splits"},
              "labels": ",".join(DRAWN), "fractions": " ".join(map(str, result["fractions"])),
              "seeds": " ".join(map(str, result["seeds"])), "finetune.config": result["finetune_config"],
              "finetune.overrides": " ".join(result["finetune_overrides"]) or "-"}
    if pre:
        params.update({"pretrain.config": pre["config"], "pretrain.overrides": " ".join(pre["overrides"]) or "-",
                       "pretrain.workdir": pre["workdir"], "pretrain.mlflow_run_id": pre["mlflow_run_id"]})
    existing = client.get_run(parent).data.params
    client.log_batch(parent, params=[Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing])
    if pre:
        metrics = {"pretrain/wall_seconds": pre["wall_seconds"], "pretrain/train_seconds": pre["train_seconds"]}
        for split in ("validate", "test"):
            p = pre[split]
            metrics[f"pretrain/{split}/zero_shot_auroc_macro_drawn"] = p["zero_shot_auroc_macro_drawn"]
            metrics[f"pretrain/{split}/zero_shot_auroc_macro_all"] = p["zero_shot_auroc_macro_all"]
            for label, v in p["zero_shot_auroc"].items():
                metrics[f"pretrain/{split}/zero_shot_auroc/{label.replace(' ', '_')}"] = v
            for d in ("image_to_text", "text_to_image"):
                for k, v in p["retrieval"][d].items():
                    metrics[f"pretrain/{split}/retrieval/{d}/{k.replace('@', '_at_')}"] = v
        client.log_batch(parent, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items() if v == v])
    for key in new_cells:
        c = result["cells"][key]
        child = client.create_run(exp_id, run_name=f"f{c['fraction']:g}-s{c['seed']}-{c['init']}",
                                  tags={"mlflow.parentRunId": parent, "medfuse.stage": "benchmark-cell",
                                        "medfuse.finetune_run_id": c["mlflow_run_id"],
                                        "medfuse.finetune_tracking_uri": c["tracking_uri"]}).info.run_id
        cp = {"label_fraction": c["fraction"], "seed": c["seed"], "init": c["init"], "n_train": c["n_train"],
              "batch_size": c["batch_size"], "epochs": c["epochs"], "workdir": c["workdir"],
              "overrides": " ".join(c["overrides"])}
        cm = {"best_epoch": c["best_epoch"], "finetune_wall_seconds": c["finetune_wall_seconds"],
              "train_seconds": c["train_seconds"]}
        for split in ("validate", "test"):
            for mode in MODES:
                cm[f"{split}/{mode}/auroc_macro_drawn"] = c[f"{split}_{mode}"]
                for label, v in c[f"{split}_{mode}_per_label"].items():
                    cm[f"{split}/{mode}/auroc/{label.replace(' ', '_')}"] = v
        client.log_batch(child, params=[Param(k, str(v)[:6000]) for k, v in cp.items()],
                         metrics=[Metric(k, float(v), now, 0) for k, v in cm.items() if v == v])
        client.set_terminated(child)
    rows = []
    for r in result["summary"]:
        row = {"fraction": r["fraction"], "init": r["init"], "n_seeds": r["n_seeds"]}
        for split in ("validate", "test"):
            for mode in MODES:
                for stat in ("mean", "min", "max", "std"):
                    row[f"{split}_{mode}_{stat}"] = r[f"{split}_{mode}"][stat]
        rows.append(row)
    table = pd.DataFrame(rows)
    client.log_table(parent, data=table, artifact_file="results_table.json")
    cells_df = pd.DataFrame([{k: v for k, v in c.items() if not isinstance(v, (dict, list))}
                             for c in result["cells"].values()])
    with __import__("tempfile").TemporaryDirectory() as tmp:
        cells_df.to_csv(Path(tmp) / "results.csv", index=False)
        client.log_artifact(parent, str(Path(tmp) / "results.csv"))
    client.log_dict(parent, result, "label_efficiency.json")
    if result["summary"]:
        import matplotlib.pyplot as plt

        fig = plot(result["summary"], pre)
        client.log_figure(parent, fig, "label_efficiency.png")
        plt.close(fig)
    for d in result.get("deltas", []):
        for split in ("validate", "test"):
            for mode in MODES:
                client.log_metric(parent, f"delta/f{d['fraction']:g}/{split}/{mode}/mean", d[f"{split}_{mode}"]["mean"],
                                  now, 0)
    client.set_terminated(parent)  # a resumed invocation logs to it again and ends it again
    return parent


def markdown(result: dict) -> str:
    lines = []
    pre = result.get("pretrain")
    if pre:
        cols = [s for s in SPLITS if s in pre]
        lines += ["| pretrained model | " + " | ".join(cols) + " |", "|---|" + "--:|" * len(cols),
                  "| zero-shot macro AUROC (drawn findings) | "
                  + " | ".join(f"{pre[c]['zero_shot_auroc_macro_drawn']:.3f}" for c in cols) + " |",
                  "| zero-shot macro AUROC (all scorable labels) | "
                  + " | ".join(f"{pre[c]['zero_shot_auroc_macro_all']:.3f}" for c in cols) + " |"]
        for d in ("image_to_text", "text_to_image"):
            for k in ("R@1", "R@5", "R@10"):
                lines.append(f"| retrieval {d} {k} | " + " | ".join(f"{pre[c]['retrieval'][d][k]:.3f}" for c in cols)
                             + " |")
        lines += [f"| pretraining wall s (training s) | {pre['wall_seconds']:.0f} ({pre['train_seconds']:.0f}) |"
                  + " |" * (len(cols) - 1), ""]
    if result["summary"]:
        fmt = lambda s: f"{s['mean']:.3f} [{s['min']:.3f}, {s['max']:.3f}]" if s else "-"  # noqa: E731
        cols = [(s, m) for s in SPLITS for m in MODES
                if any(f"{s}_{m}" in r for r in result["summary"])]
        head = " | ".join(f"{s} {'image-only' if m == 'image_only' else 'image+ctx'}" for s, m in cols)
        lines += [f"| fraction | init | seeds | train images | {head} |", "|--:|---|--:|--:|" + "--:|" * len(cols)]
        for r in result["summary"]:
            lines.append(f"| {r['fraction']:g} | {r['init']} | {r['n_seeds']} | {r['n_train_mean']:.0f} | "
                         + " | ".join(fmt(r.get(f"{s}_{m}")) for s, m in cols) + " |")
        lines += ["", f"| fraction | pairs | " + " | ".join(f"Δ {h}" for h in head.split(" | ")) + " |",
                  "|--:|--:|" + "--:|" * len(cols)]
        for d in result.get("deltas", []):
            lines.append(f"| {d['fraction']:g} | {d['n_pairs']} | " + " | ".join(
                fmt(d.get(f"{s}_{m}")) for s, m in cols) + " |")
        lines.append("\nmean [min, max] over seeds; Δ = pretrained - scratch, paired by seed.")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--seed", type=int, default=11, help="corpus seed")
    p.add_argument("--image-size", type=int, default=128, help="ingest size of the shards")
    p.add_argument("--work", type=Path, default=Path("/tmp/medfuse-bench/le"),
                   help="workdirs of the runs and the benchmark's MLflow store")
    p.add_argument("--data-work", type=Path, default=Path("/tmp/medfuse-bench/ttq"),
                   help="where the corpus and its shards are cached (shared with time_to_quality.py)")
    p.add_argument("--pretrain-config", type=Path, default=REPO / "experiments" / "pretrain_cxr_cpu.yaml")
    p.add_argument("--finetune-config", type=Path, default=REPO / "experiments" / "finetune_cxr_cpu.yaml")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--inits", nargs="+", choices=INITS, default=list(INITS))
    p.add_argument("--min-steps", type=int, default=0,
                   help="raise a cell's epochs so it takes at least this many optimizer steps (small fractions)")
    p.add_argument("--max-epochs", type=int, default=60, help="the cap on those raised epochs")
    p.add_argument("--holdout-studies", type=int, default=0,
                   help="also score every model on every image of a held-out corpus of this many studies "
                        "(another seed of the generator; 0: none)")
    p.add_argument("--holdout-seed", type=int, default=31011, help="the held-out corpus's seed")
    p.add_argument("--pretrain-only", action="store_true", help="pretrain and score the pretrained model only")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "label_efficiency.json")
    p.add_argument("overrides", nargs="*", help="pretrain.KEY=VALUE / finetune.KEY=VALUE")
    args = p.parse_args(argv)
    pre_over, fine_over = split_overrides(args.overrides)

    from decode import machine_facts

    os.environ.setdefault("MEDFUSE_PROGRESS", "0")
    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.data_work, args.studies, args.seed, args.image_size)
    summary = json.loads((data / "ingest_summary.json").read_text())
    say(f"data: {data} {summary['splits']}; load {os.getloadavg()[0]:.1f}")
    holdout = (prepare(args.data_work, args.holdout_studies, args.holdout_seed, args.image_size)
               if args.holdout_studies else None)
    start_ray()
    t_start = time.perf_counter()

    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    result = {"command": "python benchmarks/label_efficiency.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "corpus": {"generator": "benchmarks/indep_corpus.py", "studies": args.studies, "seed": args.seed,
                         "image_size": args.image_size, "splits": summary["splits"],
                         "labelled": summary.get("labelled_images_per_split")},
              "labels": DRAWN, "machine": machine_facts(), "load_avg_start": list(os.getloadavg()),
              "fractions": args.fractions, "seeds": args.seeds, "inits": args.inits,
              "finetune_config": str(args.finetune_config.relative_to(REPO) if args.finetune_config.is_relative_to(REPO)
                                     else args.finetune_config), "finetune_overrides": fine_over,
              "mlflow": previous.get("mlflow", {})}
    pre = pretrain_stage(data, args.work, args.pretrain_config, pre_over)
    if holdout is not None and (pre.get("holdout", {}).get("corpus") != str(holdout)
                                or "zero_shot_auroc_macro_drawn_ci95" not in pre["holdout"]):
        pre["holdout"] = holdout_zero_shot(pre, holdout)
        say(f"pretrained: zero-shot macro AUROC (drawn) on the held-out corpus "
            f"{pre['holdout']['zero_shot_auroc_macro_drawn']:.3f} "
            f"[{pre['holdout']['zero_shot_auroc_macro_drawn_ci95'][0]:.3f}, "
            f"{pre['holdout']['zero_shot_auroc_macro_drawn_ci95'][1]:.3f}] ({max(pre['holdout']['n'].values())} images)")
        (Path(pre["workdir"]) / "label_efficiency_pretrain.json").write_text(json.dumps(pre, indent=2))
    if holdout is not None:
        result["holdout_corpus"] = {"generator": "benchmarks/indep_corpus.py", "studies": args.holdout_studies,
                                    "seed": args.holdout_seed}
    result["pretrain"] = pre
    say(f"pretrained: zero-shot macro AUROC (drawn) validate {pre['validate']['zero_shot_auroc_macro_drawn']:.3f} "
        f"test {pre['test']['zero_shot_auroc_macro_drawn']:.3f}; retrieval i2t R@10 validate "
        f"{pre['validate']['retrieval']['image_to_text']['R@10']:.3f}")

    same_finetuning = (previous.get("finetune_overrides") == fine_over
                       and previous.get("finetune_config") == result["finetune_config"]
                       and previous.get("corpus", {}).get("seed") == args.seed
                       and previous.get("corpus", {}).get("studies") == args.studies
                       and previous.get("holdout_corpus") == result.get("holdout_corpus"))
    same_pretrain = previous.get("pretrain", {}).get("workdir") == pre["workdir"]
    # a scratch cell never reads the pretrained model, so another pretraining keeps it
    cells = {k: c for k, c in previous.get("cells", {}).items()
             if same_finetuning and (same_pretrain or c["init"] == "scratch")}
    if previous and not (same_finetuning and same_pretrain):
        say(f"the results in --out come from other settings; starting a new table"
            f"{f' (keeping its {len(cells)} scratch cells)' if cells else ''}")
        result["mlflow"] = {}
    result["cells"] = cells
    new_cells: list[str] = []

    def save():
        result["summary"] = aggregate(cells)
        result["deltas"] = deltas(cells)
        result["load_avg_end"] = list(os.getloadavg())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))

    if not args.pretrain_only:
        for fraction in args.fractions:
            for seed in args.seeds:
                for init in args.inits:
                    key = cell_key(fraction, seed, init)
                    if key in cells:
                        say(f"{key}: in {args.out.name} already; skipped")
                        continue
                    cells[key] = finetune_cell(data, args.work, args.finetune_config, fine_over, fraction, seed,
                                               init, pre["workdir"], args.keep_checkpoints,
                                               min_steps=args.min_steps, max_epochs=args.max_epochs,
                                               holdout=holdout)
                    c = cells[key]
                    say(f"{key}: validate {c['validate_image_only']:.3f}/{c['validate_image_text']:.3f} test "
                        f"{c['test_image_only']:.3f}/{c['test_image_text']:.3f} (image-only/image+context), "
                        f"{c['finetune_wall_seconds']:.0f} s")
                    new_cells.append(key)
                    save()
    result["wall_seconds_this_invocation"] = time.perf_counter() - t_start
    save()
    if args.pretrain_only:
        print(markdown(result))
        return 0
    result["mlflow"] = {"tracking_uri": None, "parent_run_id": log_mlflow(args.work, result, new_cells)}
    from pipelines import tracking

    result["mlflow"]["tracking_uri"] = tracking.tracking_uri(args.work)
    save()
    if result["summary"]:
        fig = plot(result["summary"], pre)
        png = args.out.with_suffix(".png")
        fig.savefig(png, dpi=110)
        say(f"plot: {png}")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
