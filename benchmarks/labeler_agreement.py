"""Agreement of the rule-based report labeler with a corpus's own label table.

One command::

    python benchmarks/labeler_agreement.py --corpus /tmp/medfuse-bench/ttq/indep-1000-s11 \\
        --out benchmarks/results/labeler_agreement.json

For every study of a MIMIC-CXR-layout corpus (``mimic-cxr-2.0.0-chexpert.csv.gz`` and the report
``.txt`` files) it labels FINDINGS + IMPRESSION with ``medfuse_core.evaluation.report_labeler`` and
compares with the table: per label, F1 of "positive" and agreement over the four states
(positive, negative, uncertain, unmentioned). The independent corpus (``benchmarks/indep_corpus.py``)
writes its table from its own finding draws and its own phrasing, so this measures the labeler on
text it was not written against. It asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", type=Path, required=True)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    import numpy as np
    import pandas as pd
    from sklearn.metrics import f1_score

    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.data.reports import extract_sections
    from medfuse_core.evaluation.report_labeler import rule_labeler

    table = pd.read_csv(args.corpus / "mimic-cxr-2.0.0-chexpert.csv.gz")
    texts, truth = [], []
    for row in table.itertuples(index=False):
        sid = str(int(row.subject_id))
        path = args.corpus / "files" / f"p{sid[:2]}" / f"p{sid}" / f"s{int(row.study_id)}.txt"
        if not path.exists():
            continue
        sections = extract_sections(path.read_text())
        texts.append(" ".join(sections.get(k, "") for k in ("findings", "impression")))
        truth.append([getattr(row, name.replace(" ", "_"), np.nan) if hasattr(row, name.replace(" ", "_"))
                      else row[list(table.columns).index(name)] for name in CHEXPERT_LABELS])
    truth = np.asarray(truth, dtype=np.float32)
    pred = rule_labeler(texts)
    out = {"corpus": str(args.corpus), "n_reports": len(texts), "labels": {}}
    for j, name in enumerate(CHEXPERT_LABELS):
        t, q = truth[:, j], pred[:, j]
        state = lambda a: np.where(np.isnan(a), 9, a)  # noqa: E731
        out["labels"][name] = {"positives": int((t == 1).sum()),
                               "f1_positive": float(f1_score(t == 1, q == 1, zero_division=0)),
                               "agreement_4_states": float((state(t) == state(q)).mean())}
    f1s = [v["f1_positive"] for n, v in out["labels"].items() if v["positives"] > 0]
    out["f1_positive_macro"] = float(np.mean(f1s))
    lines = ["| label | positives | F1 (positive) | agreement (4 states) |", "|---|--:|--:|--:|"]
    lines += [f"| {n} | {v['positives']} | {v['f1_positive']:.3f} | {v['agreement_4_states']:.3f} |"
              for n, v in out["labels"].items()]
    lines.append(f"| macro over labels with positives | | {out['f1_positive_macro']:.3f} | |")
    out["table_markdown"] = "\n".join(lines)
    print(out["table_markdown"])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
