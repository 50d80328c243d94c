"""What limits a guided report model's findings head: probes on its frozen vision tokens.

Three steps (docs/performance.md, "224 px instead of 128, and what limits the findings head")::

    python benchmarks/head_probe.py extract --model W --out P --corpus ARCHIVE_SHARDS:arch --corpus HELDOUT_SHARDS:ho
    python benchmarks/head_probe.py score --probe P      # the model's head per finding; other pooling heads
    python benchmarks/head_probe.py context --data ARCHIVE_SHARDS   # the clinical context alone

``extract`` saves, per corpus tag and split, the vision tokens, the study positives and the
model's own head logits. ``score`` reads the ``arch`` (train / validate / test) and ``ho`` (every
split pooled) files: thresholds are chosen on ``arch`` validate (the never-flag rule applied),
then F1 and AUROC over the drawn findings; with ``--pooling`` it also trains logistic heads with
other pooling on ``arch`` train (best epoch on validate AUROC). ``context`` fits a TF-IDF logistic
regression from the context text alone and prints its validate AUROC per drawn finding.
It asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from report_quality import _labelled_batches  # noqa: E402
from time_to_quality import DRAWN  # noqa: E402

SPLITS = ("train", "validate", "test")


def extract(model: Path, out: Path, corpora: list[str]) -> None:
    """Vision tokens (float16), positives and head logits per ``TAG_SPLIT.npz``."""
    import numpy as np
    import torch

    from medfuse_core.models.bundle import load_bundle

    torch.set_num_threads(1)
    bundle = load_bundle(model / "model", device="cpu")
    enc, head = bundle.model.vision_encoder.eval(), bundle.model.guide_head
    out.mkdir(parents=True, exist_ok=True)
    for spec in corpora:
        data, tag = spec.rsplit(":", 1)
        for split in SPLITS:
            toks, ys, logits = [], [], []
            with torch.no_grad():
                for _, images, _, positives in _labelled_batches(Path(data), split, bundle):
                    t = enc(images)
                    toks.append(t.half().numpy())
                    ys.append(positives)
                    logits.append(head(t.mean(1)).numpy())
            np.savez(out / f"{tag}_{split}.npz", tokens=np.concatenate(toks), y=np.concatenate(ys),
                     logits=np.concatenate(logits), names=np.asarray(bundle.model.guide_labels))
            print(tag, split, sum(len(y) for y in ys), flush=True)


def _load(probe: Path, tag: str, split: str | None = None) -> dict:
    import numpy as np

    parts = [np.load(probe / f"{tag}_{s}.npz") for s in ([split] if split else SPLITS)]
    return {k: np.concatenate([p[k] for p in parts]) if k != "names" else list(parts[0][k])
            for k in ("tokens", "y", "logits", "names")}


def _report(tag: str, lv, lt, lh, va, te, ho, names) -> None:
    import numpy as np

    from medfuse_core.evaluation.metrics import choose_thresholds, multilabel_metrics

    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    cuts = choose_thresholds(sig(lv), va["y"].astype(float), min_auroc=0.6)
    cells = []
    for logits, d in ((lv, va), (lt, te), (lh, ho)):
        m = multilabel_metrics(sig(logits), d["y"].astype(float), names, cuts)
        drawn = [n for n in DRAWN if n in m["auroc"]]
        cells.append((np.mean([m["f1"][n] for n in drawn]), np.mean([m["auroc"][n] for n in drawn]), m))
    print(f"{tag:26s} " + " | ".join(f"{s} F1 {f:.3f} AUROC {a:.3f}"
                                      for s, (f, a, _) in zip(("validate", "test", "held-out"), cells)))
    for split, (_, _, m) in zip(("test", "held-out"), cells[1:]):
        print(f"  {split}: " + "  ".join(f"{n} {m['f1'][n]:.2f}/{m['auroc'][n]:.2f}" for n in DRAWN if n in m["auroc"]))


def score(probe: Path, pooling: bool) -> None:
    """The model's head, and with ``pooling`` logistic heads with other pooling, on frozen tokens."""
    import numpy as np
    import torch
    from torch import nn

    from medfuse_core.evaluation.metrics import multilabel_metrics

    tr, va, te, ho = _load(probe, "arch", "train"), _load(probe, "arch", "validate"), _load(probe, "arch", "test"), \
        _load(probe, "ho")
    names = va["names"]
    _report("the model's head", va["logits"], te["logits"], ho["logits"], va, te, ho, names)
    if not pooling:
        return
    torch.set_num_threads(1)
    x = {k: torch.from_numpy(d["tokens"].astype(np.float32)) for k, d in (("tr", tr), ("va", va), ("te", te), ("ho", ho))}
    mu, sd = x["tr"].mean((0, 1)), x["tr"].std((0, 1)) + 1e-4
    x = {k: (v - mu) / sd for k, v in x.items()}
    y = torch.from_numpy(tr["y"].astype(np.float32))

    def pool(kind: str, fc: nn.Linear, t: torch.Tensor, lam: float, temp: float) -> torch.Tensor:
        if kind == "mean":
            return fc(t.mean(1))
        if kind == "meanmax":
            return fc(torch.cat([t.mean(1), t.amax(1)], -1))
        s = fc(t)  # per-token scores [B, N, L]
        if kind == "max":
            return s.amax(1)
        if kind == "csra":  # class-specific residual attention
            return s.mean(1) + lam * (torch.softmax(temp * s, 1) * s).sum(1)
        return torch.logsumexp(temp * s, 1) / temp - np.log(s.shape[1]) / temp  # "lse"

    for kind, lam, temp in [("mean", 0, 0), ("meanmax", 0, 0), ("max", 0, 0), ("csra", 1, 1), ("csra", 0.3, 1),
                            ("csra", 1, 5), ("lse", 0, 2), ("lse", 0, 5)]:
        torch.manual_seed(0)
        fc = nn.Linear(x["tr"].shape[-1] * (2 if kind == "meanmax" else 1), y.shape[1])
        opt = torch.optim.AdamW(fc.parameters(), 3e-3, weight_decay=1e-2)
        best = (-1.0, None, -1)
        for epoch in range(60):
            for b in torch.randperm(len(y)).split(128):
                loss = nn.functional.binary_cross_entropy_with_logits(pool(kind, fc, x["tr"][b], lam, temp), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
            if epoch % 5 == 4:
                with torch.no_grad():
                    m = multilabel_metrics(torch.sigmoid(pool(kind, fc, x["va"], lam, temp)).numpy(),
                                           va["y"].astype(float), names)
                auc = np.mean([m["auroc"][n] for n in DRAWN if n in m["auroc"]])
                if auc > best[0]:
                    best = (auc, {k: v.clone() for k, v in fc.state_dict().items()}, epoch)
        fc.load_state_dict(best[1])
        with torch.no_grad():
            logits = [pool(kind, fc, x[k], lam, temp).numpy() for k in ("va", "te", "ho")]
        _report(f"{kind} lam {lam} T {temp} ep {best[2]}", *logits, va, te, ho, names)


def context(data: Path) -> None:
    """Validate AUROC per drawn finding of a TF-IDF logistic regression on the context text alone."""
    import numpy as np
    import pyarrow.dataset as pads
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    from medfuse_core.data.batching import label_indices

    def load(split):
        t = pads.dataset(str(data / "shards" / f"split={split}"), format="parquet", partitioning=None) \
            .to_table(columns=["context", "labels"])
        labels = np.stack([np.asarray(v, dtype=np.float32) for v in t.column("labels").to_pylist()])
        return [c or "" for c in t.column("context").to_pylist()], labels[:, label_indices(DRAWN)] == 1.0

    (ctr, ytr), (cva, yva) = load("train"), load("validate")
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=2).fit(ctr)
    xtr, xva = vec.transform(ctr), vec.transform(cva)
    for j, name in enumerate(DRAWN):
        clf = LogisticRegression(max_iter=1000).fit(xtr, ytr[:, j])
        print(f"{name:28s} context-only validate AUROC {roc_auc_score(yva[:, j], clf.predict_proba(xva)[:, 1]):.3f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("--model", type=Path, required=True, help="a report model's workdir")
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--corpus", action="append", required=True, metavar="SHARDS_DIR:TAG",
                   help="ingested corpus and its tag (score reads 'arch' and 'ho')")
    s = sub.add_parser("score")
    s.add_argument("--probe", type=Path, required=True)
    s.add_argument("--pooling", action="store_true", help="also train heads with other pooling on arch train")
    c = sub.add_parser("context")
    c.add_argument("--data", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "extract":
        extract(args.model, args.out, args.corpus)
    elif args.cmd == "score":
        score(args.probe, args.pooling)
    else:
        context(args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
