"""Time to quality on data medfuse did not tune on: macro AUROC against training seconds.

One command::

    python benchmarks/time_to_quality.py --out benchmarks/results/time_to_quality.json

On a corpus from the independent generator (``benchmarks/indep_corpus.py``: other anatomy,
contrast, noise, finding sizes, report phrasing and layouts than ``medfuse synth``), ingested
once at 128 px, it runs in the same command:

* ``plain``: a plain single-process PyTorch loop: torchvision ResNet-18 from scratch, one
  input channel, 128 px, AdamW lr 1e-3, batch 32, 5 epochs, BCE with blank = negative,
  2 threads, on the same shards (read into memory first);
* ``medfuse``: ``medfuse finetune`` with an experiment file (default: the CPU experiment,
  ``experiments/finetune_cxr_cpu.yaml``) then ``medfuse evaluate`` (image-only and image +
  clinical context).

Both are scored by macro AUROC over the findings the generator draws that have both classes
in the split, on the validate split (the only one used to choose defaults) and on the test
split (reported, never tuned on). With 105-115 images those two splits leave about 0.02-0.03 of
noise, so both models are also scored on a **held-out corpus** (``--holdout-studies``, default
3000, from another seed of the same generator, every split of it: about 3000 frontal images that
nothing was ever chosen on), with the paired difference medfuse - plain and its 95% interval
from a patient-level bootstrap. Training seconds are the sum of the epochs' training time
(medfuse: ``perf/epoch_train_seconds`` from MLflow; validation excluded for both), and the
wall time of each whole command is reported beside them. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

# findings the independent generator draws into the pixels (No Finding is derived; Fracture is rare)
DRAWN = ["Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum", "Lung Lesion",
         "Lung Opacity", "Pleural Effusion", "Pneumothorax", "Support Devices"]


def say(msg: str) -> None:
    print(f"[time-to-quality] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def prepare(work: Path, studies: int, seed: int, image_size: int) -> Path:
    """The independent corpus and its shards (cached under ``work``)."""
    corpus, data = work / f"indep-{studies}-s{seed}", work / f"indep-{studies}-s{seed}-px{image_size}"
    env = {**os.environ, "MEDFUSE_PROGRESS": "0"}
    env.setdefault("MEDFUSE_DEID_KEY", "7" * 64)  # a benchmark key: the corpus holds no real patient
    if not (corpus / "mimic-cxr-2.0.0-chexpert.csv.gz").exists():
        say(f"generating {studies} studies (seed {seed})")
        subprocess.run([sys.executable, str(HERE / "indep_corpus.py"), "--studies", str(studies), "--seed", str(seed),
                        "--out", str(corpus)], check=True, env=env)
    if not (data / "ingest_summary.json").exists():
        say("ingesting")
        subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", "--format", "mimic-cxr", "--root", str(corpus),
                        "--out", str(data), "--image-size", str(image_size)], check=True, env=env, cwd=str(REPO),
                       stdout=subprocess.DEVNULL)
    return data


def holdout_eval(data: Path) -> dict:
    """Every labelled frontal image of a held-out corpus, in one fixed order: ``x`` (the plain loop's
    tensor), ``images`` (medfuse's input), ``raw`` labels, ``contexts``, ``patients``."""
    import numpy as np

    from medfuse_core.data.batching import blobs_to_images, images_to_tensor

    rows = {k: [] for k in ("images", "raw", "contexts", "patients")}
    for split in ("train", "validate", "test"):
        if (data / "shards" / f"split={split}").exists():
            t = read_split_table(data, split, ["patient_id"])
            rows["images"] += blobs_to_images(t.column("image").to_pylist(), t.column("image_size").to_pylist())
            rows["raw"] += t.column("labels").to_pylist()
            rows["contexts"] += t.column("context").to_pylist()
            rows["patients"] += t.column("patient_id").to_pylist()
    rows["raw"] = np.array(rows["raw"], dtype=np.float32)
    rows["x"] = images_to_tensor(rows["images"], rows["images"][0].shape[-1])
    return rows


def resample_interval(stat, groups, n: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of ``stat(row indices)`` over ``n`` resamples of whole ``groups``
    (arrays of row indices: one per patient, or one per image), drawn with replacement."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = [stat(np.concatenate([groups[k] for k in rng.integers(0, len(groups), len(groups))]))
              for _ in range(n)]
    lo, hi = np.percentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_bootstrap(a, b, raw, patients, names: list[str], n: int = 1000, seed: int = 0) -> dict:
    """Macro AUROC of ``a`` minus ``b`` on the same images, with a 95% interval from resampling patients."""
    import numpy as np

    by_patient: dict = {}
    for i, pid in enumerate(patients):
        by_patient.setdefault(pid, []).append(i)

    def difference(idx):
        pa, pb = macro_auroc(a[idx], raw[idx], names)[1], macro_auroc(b[idx], raw[idx], names)[1]
        return float(np.mean([pa[k] - pb[k] for k in sorted(set(pa) & set(pb))]))

    ci = resample_interval(difference, [np.array(v) for v in by_patient.values()], n, seed)
    return {"difference": float(macro_auroc(a, raw, names)[0] - macro_auroc(b, raw, names)[0]),
            "ci95": ci, "resamples": n, "unit": "patient"}


def read_split_table(data: Path, split: str, extra: list[str] = ()):
    """The labelled rows of one split's shards (image, size, labels, context and ``extra`` columns)."""
    import pyarrow.dataset as pads

    t = pads.dataset(str(data / "shards" / f"split={split}"), format="parquet", partitioning=None).to_table(
        columns=["image", "image_size", "labels", "labelled", "context", *extra])
    return t.filter(t.column("labelled"))


def load_split(data: Path, split: str):
    """(images [N,1,S,S] float32 normalised as medfuse does, labels [N,14] raw, contexts)."""
    import numpy as np

    from medfuse_core.data.batching import blobs_to_images, images_to_tensor

    t = read_split_table(data, split)
    images = blobs_to_images(t.column("image").to_pylist(), t.column("image_size").to_pylist())
    x = images_to_tensor(images, int(t.column("image_size")[0].as_py()))
    y = np.array(t.column("labels").to_pylist(), dtype=np.float32)
    return x, y, t.column("context").to_pylist()


def macro_auroc(probs, raw, names: list[str]) -> tuple[float, dict]:
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from medfuse_core.data.labels import CHEXPERT_LABELS, evaluation_targets

    y = evaluation_targets(raw, blank_policy="negative")
    per = {}
    for name in names:
        j = CHEXPERT_LABELS.index(name)
        m = ~np.isnan(y[:, j])
        if 0 < y[m, j].sum() < m.sum():
            per[name] = float(roc_auc_score(y[m, j], probs[m, j]))
    return float(np.mean(list(per.values()))), per


def run_plain(data: Path, epochs: int, threads: int, seed: int, holdout=None) -> tuple[dict, object]:
    """Train and score the plain loop; (results, its probabilities on the held-out images or None)."""
    import numpy as np
    import torch
    import torchvision

    from medfuse_core.data.labels import training_targets

    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    x, raw, _ = load_split(data, "train")
    targets, weights = training_targets(raw, "ignore", "negative")
    model = torchvision.models.resnet18(num_classes=raw.shape[1])
    model.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    yt, wt = torch.from_numpy(targets), torch.from_numpy(weights)
    g = torch.Generator().manual_seed(seed)
    train_seconds, curve = 0.0, []
    evals = {s: load_split(data, s) for s in ("validate", "test")}
    for epoch in range(epochs):
        model.train()
        t0 = time.perf_counter()
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x) - 31, 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x[idx]), yt[idx], weight=wt[idx],
                                                                        reduction="sum") / wt[idx].sum().clamp(min=1)
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_seconds += time.perf_counter() - t0
        model.eval()
        with torch.no_grad():
            val = torch.sigmoid(torch.cat([model(evals["validate"][0][i:i + 64])
                                           for i in range(0, len(evals["validate"][0]), 64)])).numpy()
        curve.append({"epoch": epoch, "train_seconds": train_seconds,
                      "val_auroc": macro_auroc(val, evals["validate"][1], DRAWN)[0]})
        say(f"plain epoch {epoch + 1}/{epochs}: {train_seconds:.0f} s, val AUROC {curve[-1]['val_auroc']:.3f}")
    out = {"train_seconds": train_seconds, "curve": curve}
    predict = lambda xs: torch.sigmoid(torch.cat([model(xs[i:i + 64]) for i in range(0, len(xs), 64)])).numpy()  # noqa: E731
    with torch.no_grad():
        for split, (xs, ys, _) in evals.items():
            out[split], out[f"{split}_per_label"] = macro_auroc(predict(xs), ys, DRAWN)
        held = predict(holdout["x"]) if holdout is not None else None
    if held is not None:
        out["holdout"], out["holdout_per_label"] = macro_auroc(held, holdout["raw"], DRAWN)
    return out, held


def run_medfuse(data: Path, work: Path, config: Path, overrides: list[str], holdout=None) -> tuple[dict, dict]:
    """Fine-tune and score medfuse; (results, {mode: probabilities on the held-out images} or {})."""
    import mlflow
    import numpy as np

    from medfuse_core.experiment import load_config
    from pipelines import evaluate, finetune
    from pipelines.runtime import init_ray

    init_ray(num_cpus=os.cpu_count())
    cfg = load_config(config, overrides)
    workdir = work / f"medfuse-{int(time.time())}"
    t0 = time.perf_counter()
    facts = finetune.run(cfg, data, workdir)
    finetune_wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(facts["tracking_uri"])
    hist = sorted(client.get_metric_history(facts["mlflow_run_id"], "perf/epoch_train_seconds"), key=lambda m: m.step)
    val_hist = sorted(client.get_metric_history(facts["mlflow_run_id"], "val/auroc_macro_image_only"),
                      key=lambda m: m.step)
    train_seconds = float(sum(m.value for m in hist))
    out = {"train_seconds": train_seconds, "finetune_wall_seconds": finetune_wall, "config": str(config),
           "overrides": overrides, "best_epoch": facts["best_epoch"],
           "curve": [{"epoch": i, "train_seconds": float(sum(m.value for m in hist[:i + 1])),
                      "val_auroc_image_only_all_labels": v.value} for i, v in enumerate(val_hist)]}
    # score the best model on both splits with the project's own scorer (no MLflow logging)
    scores = evaluate.score_splits(facts["model_dir"], data, blank_policy=cfg.data.blank_policy)
    from medfuse_core.data.labels import CHEXPERT_LABELS

    names = [CHEXPERT_LABELS.index(n) for n in cfg.data.labels]

    def to_chexpert(a):  # the model's label columns -> the 14 CheXpert columns (NaN where it has none)
        full = np.full((len(a), len(CHEXPERT_LABELS)), np.nan, np.float32)
        full[:, names] = a
        return full

    for split in ("validate", "test"):
        for mode in ("image_only", "image_text"):
            out[f"{split}_{mode}"], out[f"{split}_{mode}_per_label"] = macro_auroc(
                to_chexpert(scores[split][mode]), to_chexpert(scores[split]["y"]), DRAWN)
    held = {}
    if holdout is not None:  # in this process, on the rows in holdout_eval's order (uncalibrated: AUROC is rank-based)
        from medfuse_core.evaluation.inference import predict_probabilities
        from medfuse_core.models.bundle import load_bundle

        bundle = load_bundle(facts["model_dir"])
        for mode, texts in (("image_only", None), ("image_text", holdout["contexts"])):
            held[mode] = to_chexpert(predict_probabilities(bundle, holdout["images"], texts))
            out[f"holdout_{mode}"], out[f"holdout_{mode}_per_label"] = macro_auroc(held[mode], holdout["raw"], DRAWN)
    return out, held


def seed_spread(result: dict, data: Path, args, holdout: dict) -> dict:
    """Both sides again with training seeds 1..K (seed 0 is the main run), held-out macro AUROC per
    seed, and the per-seed paired difference medfuse - plain with a t-interval over seeds."""
    import numpy as np
    from scipy import stats

    runs = [{"seed": 0, "plain": result["plain"]["holdout"], "plain_train_seconds": result["plain"]["train_seconds"],
             **{f"medfuse_{m}": result["medfuse"][f"holdout_{m}"] for m in ("image_only", "image_text")},
             "medfuse_train_seconds": result["medfuse"]["train_seconds"]}]
    for seed in range(1, args.extra_seeds + 1):
        plain, _ = run_plain(data, epochs=5, threads=2, seed=seed, holdout=holdout)
        med, _ = run_medfuse(data, args.work, args.config, list(args.overrides) + [f"train.seed={seed}"], holdout)
        runs.append({"seed": seed, "plain": plain["holdout"], "plain_train_seconds": plain["train_seconds"],
                     **{f"medfuse_{m}": med[f"holdout_{m}"] for m in ("image_only", "image_text")},
                     "medfuse_train_seconds": med["train_seconds"]})
        say(f"seed {seed}: held-out plain {plain['holdout']:.3f}, medfuse {med['holdout_image_only']:.3f} / "
            f"{med['holdout_image_text']:.3f}")
    out = {"runs": runs, "difference": {}}
    for m in ("image_only", "image_text"):
        diffs = np.array([r[f"medfuse_{m}"] - r["plain"] for r in runs])
        half = float(stats.t.ppf(0.975, len(diffs) - 1) * diffs.std(ddof=1) / np.sqrt(len(diffs)))
        out["difference"][m] = {"mean": float(diffs.mean()), "per_seed": diffs.tolist(),
                                "ci95": [float(diffs.mean() - half), float(diffs.mean() + half)]}
    for side in ("plain", "medfuse_image_only", "medfuse_image_text"):
        v = np.array([r[side] for r in runs])
        out[side] = {"mean": float(v.mean()), "sd": float(v.std(ddof=1))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--holdout-studies", type=int, default=3000, help="held-out corpus size (0: none)")
    p.add_argument("--holdout-seed", type=int, default=7011)
    p.add_argument("--work", type=Path, default=Path("/tmp/medfuse-bench/ttq"))
    p.add_argument("--config", type=Path, default=REPO / "experiments" / "finetune_cxr_cpu.yaml")
    p.add_argument("--extra-seeds", type=int, default=0,
                   help="also train both sides with training seeds 1..K, scored on the held-out corpus "
                        "(training-seed spread: a bigger test set does not remove it)")
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument("--skip-medfuse", action="store_true")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "time_to_quality.json")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the medfuse experiment")
    args = p.parse_args(argv)

    import numpy as np
    from decode import machine_facts

    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work, args.studies, args.seed, args.image_size)
    summary = json.loads((data / "ingest_summary.json").read_text())
    say(f"data: {summary['splits']} labelled {summary.get('labelled_images_per_split')}; load {os.getloadavg()[0]:.1f}")
    result = {"command": "python benchmarks/time_to_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "corpus": {"generator": "benchmarks/indep_corpus.py", "studies": args.studies, "seed": args.seed,
                         "image_size": args.image_size, "splits": summary["splits"]},
              "labels": DRAWN, "machine": machine_facts(), "load_avg_start": list(os.getloadavg())}
    holdout, plain_held, medfuse_held = None, None, {}
    if args.holdout_studies:
        hdata = prepare(args.work, args.holdout_studies, args.holdout_seed, args.image_size)
        holdout = holdout_eval(hdata)
        result["holdout_corpus"] = {"generator": "benchmarks/indep_corpus.py", "studies": args.holdout_studies,
                                    "seed": args.holdout_seed, "images": len(holdout["raw"]),
                                    "patients": len(set(holdout["patients"]))}
        say(f"held-out corpus: {len(holdout['raw'])} labelled frontal images")
    held_file = args.work / f"plain-holdout-{args.holdout_studies}-s{args.holdout_seed}-{args.studies}-s{args.seed}.npy"
    if not args.skip_plain:
        t0 = time.perf_counter()
        result["plain"], plain_held = run_plain(data, epochs=5, threads=2, seed=0, holdout=holdout)
        result["plain"]["wall_seconds"] = time.perf_counter() - t0
        if plain_held is not None:
            np.save(held_file, plain_held)
        say(f"plain: val {result['plain']['validate']:.3f} test {result['plain']['test']:.3f} "
            f"in {result['plain']['train_seconds']:.0f} s of training")
    elif holdout is not None and held_file.exists():  # the plain loop's scores from an earlier run of this command
        plain_held = np.load(held_file)
    if not args.skip_medfuse:
        result["medfuse"], medfuse_held = run_medfuse(data, args.work, args.config, list(args.overrides), holdout)
        m = result["medfuse"]
        say(f"medfuse: val {m['validate_image_only']:.3f}/{m['validate_image_text']:.3f} "
            f"test {m['test_image_only']:.3f}/{m['test_image_text']:.3f} (image-only/image+context) in "
            f"{m['train_seconds']:.0f} s of training ({m['finetune_wall_seconds']:.0f} s finetune wall)")
    if plain_held is not None and medfuse_held:
        result["holdout_difference"] = {
            mode: paired_bootstrap(medfuse_held[mode], plain_held, holdout["raw"], holdout["patients"], DRAWN)
            for mode in ("image_only", "image_text")}
        for mode, d in result["holdout_difference"].items():
            say(f"held-out: medfuse {mode} - plain = {d['difference']:+.3f} "
                f"(95% CI {d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f})")
    if args.extra_seeds and holdout is not None and plain_held is not None and medfuse_held:
        result["seeds"] = seed_spread(result, data, args, holdout)
        sp = result["seeds"]
        for mode in ("image_only", "image_text"):
            d = sp["difference"][mode]
            say(f"held-out over {len(sp['runs'])} training seeds: medfuse {mode} - plain = {d['mean']:+.3f} "
                f"(per seed {', '.join(f'{v:+.3f}' for v in d['per_seed'])}; 95% t-interval "
                f"{d['ci95'][0]:+.3f} .. {d['ci95'][1]:+.3f})")
    result["load_avg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(args.out.read_text()) if args.out.exists() else {}
    for key in ("plain", "medfuse"):  # keep the other side of an earlier run when one side is skipped
        if key not in result and key in previous:
            result[key] = previous[key]
    args.out.write_text(json.dumps(result, indent=2))
    rows = ["| run | training s | validate AUROC | test AUROC | held-out AUROC |", "|---|--:|--:|--:|--:|"]
    fmt = lambda v: "" if v is None else f"{v:.3f}"  # noqa: E731
    if "plain" in result:
        r = result["plain"]
        rows.append(f"| plain loop (image) | {r['train_seconds']:.0f} | {r['validate']:.3f} | {r['test']:.3f} | "
                    f"{fmt(r.get('holdout'))} |")
    if "medfuse" in result:
        r = result["medfuse"]
        for mode in ("image_only", "image_text"):
            rows.append(f"| medfuse {mode} | {r['train_seconds']:.0f} | {r[f'validate_{mode}']:.3f} | "
                        f"{r[f'test_{mode}']:.3f} | {fmt(r.get(f'holdout_{mode}'))} |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
