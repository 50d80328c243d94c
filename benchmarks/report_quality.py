"""Report generation on the independent corpus: train, draft the test split, score.

One command::

    python benchmarks/report_quality.py --out benchmarks/results/report_quality.json [key=value ...]

It prepares the independent corpus of ``time_to_quality.py`` (cached), runs
``medfuse train-report --config experiments/report_cxr_cpu.yaml`` (overrides after the flags),
then ``medfuse evaluate`` on the trained model (``report_generation`` metrics on the test split),
and beside it two plain baselines scored the same way: every test image gets the most common
training report (a label-blind draft), and every test image gets the report of a random
training image. A guided model's LM is also scored prompted with the reference labels
instead of its head's flags (the head made perfect), and the head's flags are scored directly
against the study labels. ``--train-studies N --train-seed S`` trains on another corpus of the
same generator (a larger archive) and still scores on this one. Then it checks the drafts against the corpus's identifiers (patient and study
ids, the header names and institution): none may appear. It asserts nothing.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from time_to_quality import DRAWN, prepare  # noqa: E402

from decode import machine_facts  # noqa: E402

# the header identifiers the independent generator writes into every file (benchmarks/indep_corpus.py)
HEADER_IDENTIFIERS = ["SYNTHETIC^INDEPENDENT", "SYNTHETIC", "INDEPENDENT", "NOBODY^FAKE", "NOBODY", "NOT A REAL HOSPITAL"]


def say(msg: str) -> None:
    print(f"[report-bench] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def drawn_macro_f1(clinical_efficacy: dict) -> float:
    """Macro F1 over the findings the independent generator draws (the issue's floor metric);
    a label no reference and no draft mentions is left out, as in ``f1_macro_14``."""
    per = clinical_efficacy["per_label_f1"]
    vals = [per[k] for k in DRAWN if per.get(k) is not None and per[k] == per[k]]
    return float(sum(vals) / len(vals)) if vals else float("nan")


def corpus_identifiers(corpus: Path) -> list[str]:
    """Patient and study ids of the corpus (its split table) plus the header names."""
    ids = set(HEADER_IDENTIFIERS)
    with gzip.open(corpus / "mimic-cxr-2.0.0-split.csv.gz", "rt") as fh:
        for row in csv.DictReader(fh):
            ids.update({row["subject_id"], row["study_id"], f"p{row['subject_id']}", f"s{row['study_id']}"})
    return sorted(ids)


def references(data: Path, split: str, with_ids: bool = False):
    import pyarrow.dataset as pads

    from medfuse_core.data.reports import extract_sections
    from medfuse_core.models.report import report_target

    t = pads.dataset(str(data / "shards" / f"split={split}"), format="parquet", partitioning=None).to_table(
        columns=["record_id", "report"])
    refs = [report_target(extract_sections(r or "")) for r in t.column("report").to_pylist()]
    return dict(zip(t.column("record_id").to_pylist(), refs)) if with_ids else refs


def decoding_tag(decoding) -> str:
    """A file-name suffix for drafts made under ``decoding.KEY=VALUE`` settings ("" for none), so
    drafts under other settings than the model's own go to their own files."""
    return "".join(f"-{k.removeprefix('decoding.')}_{v}" for k, v in (d.split("=", 1) for d in decoding))


def score_validate(data: Path, workdir: Path, env: dict, decoding=(), tag: str = "") -> dict:
    """``medfuse generate --split validate`` scored like evaluate scores test (the split that
    chooses defaults; test is only reported)."""
    from pipelines.evaluate_report import score_drafts

    out = workdir / f"validate_drafts{tag}{decoding_tag(decoding)}.csv"
    if not out.exists():
        subprocess.run([sys.executable, "-m", "pipelines.cli", "generate", "--model", str(workdir), "--data", str(data),
                        "--split", "validate", "--out", str(out), *decoding], check=True, env=env, cwd=str(REPO))
    refs = references(data, "validate", with_ids=True)
    with open(out, newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if refs.get(r["record_id"], "").strip()]
    return score_drafts([r["report"] for r in rows], [refs[r["record_id"]] for r in rows])


def _labelled_batches(data: Path, split: str, bundle):
    """``(record_ids, images, contexts, positives [B, L])`` over a split in batches of 16, the
    positives being the study labels equal to 1 over the guidance head's labels."""
    import numpy as np
    import pyarrow.dataset as pads

    from medfuse_core.data.batching import blobs_to_tensor, label_indices

    names = list(bundle.model.guide_labels)
    cols = ["record_id", "image", "image_size", "context", "labels"]
    ds = pads.dataset(str(data / "shards" / f"split={split}"), format="parquet", partitioning=None)
    for batch in ds.to_batches(columns=cols, batch_size=16):
        rows = {c: batch.column(c).to_pylist() for c in cols}
        labels = np.stack([np.asarray(v, dtype=np.float32) for v in rows["labels"]])[:, label_indices(names)]
        images = blobs_to_tensor(np.asarray(rows["image"], dtype=object), np.asarray(rows["image_size"]),
                                 bundle.image_size)
        yield rows["record_id"], images, [c if isinstance(c, str) else "" for c in rows["context"]], labels == 1.0


def score_oracle(data: Path, workdir: Path, split: str = "test", decoding=()) -> dict:
    """Drafts of a guided model prompted with each study's reference labels instead of its head's
    flags, scored like the model's own: the clinical F1 the LM reaches were the findings head
    perfect, which tells the head's share of the gap from the LM's."""
    import torch

    from medfuse_core.evaluation.report_inference import decoding_settings, draft_batch
    from medfuse_core.models.bundle import load_bundle
    from pipelines.evaluate_report import score_drafts

    bundle = load_bundle(workdir / "model", device="cpu")
    settings = decoding_settings(bundle, decoding)
    refs = references(data, split, with_ids=True)
    drafts, kept = [], []
    for ids, images, contexts, positives in _labelled_batches(data, split, bundle):
        drafts += draft_batch(bundle, images, contexts, settings, flags=torch.from_numpy(positives))
        kept += [refs[r] for r in ids]
    keep = [k for k, r in enumerate(kept) if r.strip()]
    return score_drafts([drafts[k] for k in keep], [kept[k] for k in keep])


def score_head(data: Path, workdir: Path, split: str = "test") -> dict:
    """A guided model's findings head scored directly against the study labels (no drafting):
    AUROC, and F1 of its flags at the thresholds it drafts with, per drawn finding and their macro."""
    import numpy as np
    import torch

    from medfuse_core.evaluation.metrics import multilabel_metrics
    from medfuse_core.models.bundle import load_bundle
    from medfuse_core.models.report import guide_flags

    bundle = load_bundle(workdir / "model", device="cpu")
    names = list(bundle.model.guide_labels)
    cuts = (bundle.extra or {}).get("guide_thresholds") or {}
    probs, flags, ys = [], [], []
    with torch.no_grad():
        for _, images, _, positives in _labelled_batches(data, split, bundle):
            p, f = guide_flags(bundle.model, images, [cuts.get(n, 0.5) for n in names])
            probs.append(p.numpy())
            flags.append(f.numpy())
            ys.append(positives)
    y = np.concatenate(ys).astype(np.float64)
    m = flag_scores(np.concatenate(flags), y, names)
    auroc = multilabel_metrics(np.concatenate(probs), y, names)["auroc"]
    return {**m, "auroc": auroc, "auroc_macro_drawn": float(np.mean([auroc[n] for n in DRAWN if n in auroc]))}


def flag_scores(flags, positives, names) -> dict:
    """F1 of flags ``[N, L]`` (exactly what the LM is prompted with) against the study positives, per
    label and macro over the drawn findings."""
    import numpy as np

    from medfuse_core.evaluation.metrics import multilabel_metrics

    # the flags as 0/1 scores at a 0.5 cut
    m = multilabel_metrics(np.asarray(flags, dtype=np.float64), np.asarray(positives, dtype=np.float64), names)
    return {"f1": m["f1"], "counts": m["counts"], "n": m["n"],
            "f1_macro_drawn": float(np.mean([m["f1"][n] for n in DRAWN if n in m["f1"]]))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/medfuse-bench/ttq"))
    p.add_argument("--studies", type=int, default=1000)
    p.add_argument("--seed", type=int, default=11)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--train-studies", type=int, default=None,
                   help="train on another corpus of the independent generator (this many studies, --train-seed); "
                        "drafts are still scored on the --studies/--seed corpus")
    p.add_argument("--train-seed", type=int, default=None)
    p.add_argument("--config", default=str(REPO / "experiments" / "report_cxr_cpu.yaml"))
    p.add_argument("--workdir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "report_quality.json")
    p.add_argument("--rescore", action="store_true", help="score the model an earlier run trained in --workdir")
    p.add_argument("--decoding", action="append", default=[], metavar="decoding.KEY=VALUE",
                   help="decoding settings for every draft scored (repeatable), e.g. decoding.candidates=6")
    p.add_argument("--validate", action="store_true", help="also draft and score the validate split")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()

    import numpy as np

    from medfuse_core.evaluation.report_metrics import leaked_identifiers
    from pipelines.evaluate_report import score_drafts

    data = prepare(args.work, args.studies, args.seed, args.image_size)
    corpus = args.work / f"indep-{args.studies}-s{args.seed}"
    train_data, train_corpus = data, corpus
    if args.train_studies or args.train_seed is not None:
        t_studies, t_seed = args.train_studies or args.studies, args.seed if args.train_seed is None else args.train_seed
        train_data = prepare(args.work, t_studies, t_seed, args.image_size)
        train_corpus = args.work / f"indep-{t_studies}-s{t_seed}"
    workdir = args.workdir or args.work / f"report-{int(time.time())}"
    env = {**os.environ, "MEDFUSE_PROGRESS": "0"}
    say(f"machine: {json.dumps(machine_facts())}")
    # drafts of another corpus than the default benchmark's go to their own files
    tag = "" if (args.studies, args.seed) == (p.get_default("studies"), p.get_default("seed")) else \
        f"-{args.studies}-s{args.seed}"
    ev = workdir / f"evaluate{tag}{decoding_tag(args.decoding)}.json"
    train_s = eval_s = float("nan")
    if args.rescore and (workdir / "model" / "medfuse_model.json").exists():
        say(f"scoring the model already trained in {workdir}")
    else:
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pipelines.cli", "train-report", "--config", args.config, "--data",
                        str(train_data), "--workdir", str(workdir), *args.overrides], check=True, env=env, cwd=str(REPO))
        train_s = time.time() - t0
        say(f"trained in {train_s:.0f} s")
    if not (args.rescore and ev.exists()):
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "pipelines.cli", "evaluate", "--model", str(workdir), "--data",
                        str(data), "--out", str(ev), *args.decoding], check=True, env=env, cwd=str(REPO))
        eval_s = time.time() - t0
    result = json.loads(ev.read_text())
    with open(ev.with_name(f"{ev.stem}_drafts.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    drafts = [r["report"] for r in rows]
    refs = [r["reference"] for r in rows]
    keep = [k for k, r in enumerate(refs) if r.strip()]
    train_refs = [r for r in references(train_data, "train") if r.strip()]
    common = Counter(train_refs).most_common(1)[0][0]
    rng = np.random.default_rng(0)
    baselines = {
        "most_common_training_report": score_drafts([common] * len(keep), [refs[k] for k in keep]),
        "random_training_report": score_drafts([train_refs[i] for i in rng.integers(0, len(train_refs), len(keep))],
                                               [refs[k] for k in keep]),
    }
    leaks = leaked_identifiers(drafts, sorted(set(corpus_identifiers(corpus)) | set(corpus_identifiers(train_corpus))))
    validate = score_validate(data, workdir, env, args.decoding, tag) if args.validate else None
    guided = json.loads((workdir / "model" / "medfuse_model.json").read_text())["extra"].get("guide_thresholds")
    oracle = score_oracle(data, workdir, decoding=args.decoding) if guided else None
    head = score_head(data, workdir) if guided else None
    out = {"command": " ".join(sys.argv), "decoding": args.decoding, "machine": machine_facts(), "data": str(data),
           "train_data": str(train_data), "workdir": str(workdir),
           "train_seconds": train_s, "evaluate_seconds": eval_s, "model": result["report_generation"],
           "baselines": baselines, "identifier_leaks": len(leaks), "samples": rows[:3], "validate": validate,
           "reference_flags": oracle, "head_flags": head}
    for m in (out["model"], validate, oracle, *baselines.values()):
        if m:
            m["clinical_efficacy"]["f1_macro_drawn"] = drawn_macro_f1(m["clinical_efficacy"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))

    def line(name, m):
        ce = m["clinical_efficacy"]
        return (f"| {name} | {ce['f1_macro_drawn']:.3f} | {ce['f1_macro_14']:.3f} ({ce['labels_scored_14']}) | {ce['f1_micro_14']:.3f} | "
                f"{ce['f1_macro_5']:.3f} | {ce['f1_micro_5']:.3f} | {m['bleu4']:.3f} | {m['rouge_l']:.3f} | "
                f"{m['findings_and_impression_rate']:.2f} |")

    print("\n| drafts | macro F1 drawn | macro F1-14 (labels scored) | micro F1-14 | macro F1-5 | micro F1-5 | BLEU-4 | ROUGE-L | "
          "FINDINGS+IMPRESSION |\n|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    print(line("medfuse train-report", out["model"]))
    if validate:
        print(line("medfuse train-report, validate split", validate))
    if oracle:
        print(line("the same LM, prompted with the reference labels", oracle))
    for name, m in baselines.items():
        print(line(name.replace("_", " "), m))
    if head:
        print(f"\nthe findings head's flags against the study labels, test: macro F1 over the drawn findings "
              f"{head['f1_macro_drawn']:.3f}, macro AUROC {head['auroc_macro_drawn']:.3f}")
    print(f"\nidentifier leaks in {len(drafts)} drafts: {len(leaks)}; training {train_s:.0f} s, evaluate {eval_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
