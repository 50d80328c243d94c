"""The fusion comparison: the four fusion modules x several seeds on the independent corpus,
each trial scored image-only and with clinical context.

One command::

    python benchmarks/fusion_compare.py --out benchmarks/results/fusion_compare.json [key=value ...]

It runs ``medfuse sweep`` with ``experiments/compare_fusion_cpu.yaml`` (a grid of fusion
module x seed, FIFO: every trial trains to the end) on the corpus of
``benchmarks/time_to_quality.py`` (``benchmarks/indep_corpus.py``, 1000 studies, seed 11,
128 px; generated and ingested once under ``--work``), then scores every trial's best model
on the validate and test splits with the project's scorer, image-only and image + context:
macro AUROC over the findings the generator draws. It writes the per-trial scores, a table of
mean and standard deviation per variant, and a plot (``--plot``); the table and plot are also
logged to the sweep's parent MLflow run. ``key=value`` overrides reach the base experiment
(e.g. ``train.epochs=3``), ``sweep.KEY=VALUE`` the sweep. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

MODES = ("image_only", "image_text")


def say(msg: str) -> None:
    print(f"[fusion-compare] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def score_trial(model_dir: Path, data: Path, blank_policy: str, labels: list[str]) -> dict:
    """Macro AUROC over the drawn findings, per split and scoring mode."""
    import numpy as np

    from medfuse_core.data.labels import CHEXPERT_LABELS
    from pipelines import evaluate
    from time_to_quality import DRAWN, macro_auroc

    scores = evaluate.score_splits(model_dir, data, blank_policy=blank_policy)
    out = {}
    for split in ("validate", "test"):
        y = scores[split]["y"]
        raw = np.full((len(y), len(CHEXPERT_LABELS)), np.nan, np.float32)
        for j, name in enumerate(labels):
            raw[:, CHEXPERT_LABELS.index(name)] = y[:, j]
        for mode in MODES:
            probs = np.full_like(raw, np.nan)
            for j, name in enumerate(labels):
                probs[:, CHEXPERT_LABELS.index(name)] = scores[split][mode][:, j]
            out[f"{split}_{mode}"] = macro_auroc(probs, raw, DRAWN)[0]
    return out


def summarise(trials: list[dict]) -> list[dict]:
    """Mean, sample standard deviation and n per fusion module and scoring mode."""
    rows = []
    for fusion in sorted({t["fusion"] for t in trials}):
        mine = [t for t in trials if t["fusion"] == fusion]
        row = {"fusion": fusion, "n_seeds": len(mine)}
        for key in [f"{s}_{m}" for s in ("validate", "test") for m in MODES]:
            vals = [t[key] for t in mine]
            row[key] = {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    head = ("| fusion | seeds | validate image-only | validate image + context | test image-only | "
            "test image + context |\n|---|--:|--:|--:|--:|--:|\n")
    cell = lambda v: f"{v['mean']:.3f} ± {v['sd']:.3f}"  # noqa: E731
    return head + "".join(
        f"| {r['fusion']} | {r['n_seeds']} | {cell(r['validate_image_only'])} | {cell(r['validate_image_text'])} | "
        f"{cell(r['test_image_only'])} | {cell(r['test_image_text'])} |\n" for r in rows)


def plot(trials: list[dict], rows: list[dict], path: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    fusions = [r["fusion"] for r in rows]
    for ax, split in zip(axes, ("validate", "test")):
        for k, (mode, colour) in enumerate(zip(MODES, ("tab:blue", "tab:orange"))):
            xs = [i + (k - 0.5) * 0.3 for i in range(len(fusions))]
            means = [r[f"{split}_{mode}"]["mean"] for r in rows]
            sds = [r[f"{split}_{mode}"]["sd"] for r in rows]
            ax.errorbar(xs, means, yerr=sds, fmt="o", color=colour, capsize=4,
                        label=mode.replace("_", " ").replace("text", "+ context"))
            for i, fusion in enumerate(fusions):
                pts = [t[f"{split}_{mode}"] for t in trials if t["fusion"] == fusion]
                ax.scatter([xs[i]] * len(pts), pts, s=10, color=colour, alpha=0.4)
        ax.set_xticks(range(len(fusions)), fusions)
        ax.set_title(f"{split} split")
        ax.set_ylabel("macro AUROC (drawn findings)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("fusion modules on the independent corpus: mean ± sd over seeds (dots: seeds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return fig


def completed_so_far(workdir: Path) -> dict:
    """The sweep's facts with the trials that have logged a model so far (a sweep still running or stopped)."""
    facts = json.loads((workdir / "sweep.json").read_text())
    trials = []
    for state in sorted((workdir / "trials").glob("*/finetune.json")):
        trial_id = state.parent.name
        params = json.loads((workdir / "tune" / f"trial_{trial_id}" / "params.json").read_text())
        done = bool(json.loads(state.read_text()).get("model_uri"))
        trials.append({"trial_id": trial_id, "status": "completed" if done else "unfinished", "params": params})
    facts["trials"] = trials
    return facts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--work", type=Path, default=Path("/tmp/medfuse-bench/ttq"))
    p.add_argument("--config", type=Path, default=REPO / "experiments" / "compare_fusion_cpu.yaml")
    p.add_argument("--workdir", type=Path, default=None, help="the sweep's workdir (default: under --work; "
                                                               "rerunning resumes it)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fusion_compare.json")
    p.add_argument("--plot", type=Path, default=REPO / "docs" / "fusion_compare.png")
    p.add_argument("--score-only", action="store_true",
                   help="score the trials the sweep in --workdir has completed so far, without running it "
                        "(a partial table; rerun without this flag to resume the sweep)")
    p.add_argument("--retry-errored", action="store_true", help="resume errored trials too")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    import mlflow

    from decode import machine_facts
    from medfuse_core.sweep_config import load_sweep
    from pipelines import sweep as sweep_mod
    from pipelines.runtime import init_ray
    from time_to_quality import prepare

    args.work.mkdir(parents=True, exist_ok=True)
    data = prepare(args.work, args.studies, args.seed, args.image_size)
    plan = load_sweep(args.config, args.overrides)
    workdir = args.workdir or args.work / f"compare-{plan.config.name}"
    init_ray(num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    if args.score_only:
        facts = completed_so_far(workdir)
    else:
        facts = sweep_mod.run(plan, data, workdir, retry_errored=args.retry_errored)
    wall = time.perf_counter() - t0
    trials = []
    for t in facts["trials"]:
        model = workdir / "trials" / t["trial_id"] / "model"
        if t["status"] != "completed" or not model.exists():
            say(f"trial {t['trial_id']} is {t['status']}: left out")
            continue
        scores = score_trial(model, data, plan.base.data.blank_policy, list(plan.base.data.labels))
        trials.append({"trial_id": t["trial_id"], "fusion": t["params"]["model.fusion.name"],
                       "seed": t["params"].get("train.seed"), **scores})
        say(f"{trials[-1]['fusion']} seed {trials[-1]['seed']}: " +
            ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    rows = summarise(trials)
    table = markdown(rows)
    print(table)
    fig = plot(trials, rows, args.plot)
    mlflow.set_tracking_uri(f"sqlite:///{workdir.resolve() / 'mlflow.db'}")
    with mlflow.start_run(run_id=facts["parent_run_id"], nested=False):
        mlflow.log_text(table, "fusion_compare/table.md")
        mlflow.log_dict({"trials": trials, "summary": rows}, "fusion_compare/scores.json")
        mlflow.log_figure(fig, "fusion_compare/fusion_compare.png")
    out = {"machine": machine_facts(), "config": str(args.config), "overrides": args.overrides,
           "partial": bool(args.score_only), "n_trials_planned": len(plan.config.sweep.space["model.fusion.name"].args)
           * len(plan.config.sweep.space["train.seed"].args) * plan.config.sweep.num_samples,
           "sweep_wall_seconds": wall, "trials": trials, "summary": rows, "table_markdown": table,
           "parent_run_id": facts["parent_run_id"], "data": str(data)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    say(f"wrote {args.out} and {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
