"""``medfuse evaluate`` on a report model: drafts for the test split, scored under
``report_generation``: BLEU-4 and ROUGE-L (sacrebleu, rouge-score), clinical efficacy (a
labeler on drafts and references: micro/macro F1 over the 14 CheXpert labels and the 5
competition findings, and per label), the share of drafts with both FINDINGS and IMPRESSION,
drafts in which the de-identification scrubber finds anything it would redact, and drafts that stop
inside a sentence (cut by ``decoding.max_new_tokens``).

References are the de-identified report's FINDINGS + IMPRESSION, as the model was trained on.
The drafts are written beside ``--out`` (``<name>_drafts.csv``: record_id, report, reference).
MLflow (the model's run): the metrics, a per-finding F1 chart, a table of sample drafts beside
their references (de-identified text, no images) and every draft as a CSV artifact.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from medfuse_core.data.sources import SourceError
from pipelines import tracking
from pipelines.shards import has_split

log = logging.getLogger("medfuse")

N_SAMPLES = 20


def phi_suspects(texts: Sequence[str]) -> int:
    """How many texts the report scrubber would change (a date, an id, a titled name, ...)."""
    from medfuse_core.data.deid import scrub_report

    return sum(1 for t in texts if sum(scrub_report(t)[1].values()) > 0)


def score_drafts(drafts: Sequence[str], references: Sequence[str], labeler: str = "rules") -> dict:
    """The ``report_generation`` metrics of drafts against their references."""
    from medfuse_core.evaluation.report_labeler import LABELERS, clinical_efficacy
    from medfuse_core.evaluation.report_metrics import ends_mid_sentence, has_findings_and_impression, nlg_metrics

    ce = clinical_efficacy(drafts, references, labeler=LABELERS.get(labeler)())
    return {"n": len(drafts), **nlg_metrics(drafts, references), "clinical_efficacy": {"labeler": labeler, **ce},
            "findings_and_impression_rate": float(np.mean([has_findings_and_impression(d) for d in drafts]))
            if drafts else float("nan"),
            "phi_suspect_drafts": phi_suspects(drafts),
            "drafts_ending_mid_sentence": sum(ends_mid_sentence(d) for d in drafts)}


def per_label_f1_figure(per_label: dict):
    """A bar chart of clinical-efficacy F1 per CheXpert label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in per_label if per_label[n] is not None]  # labels nobody mentions have no F1
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.barh(names[::-1], [per_label[n] for n in names[::-1]], color="#4477aa")
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1 (labels of the draft against the reference report's)")
    ax.set_title("Clinical efficacy per finding")
    fig.tight_layout()
    return fig


def run(bundle_dir: Path, facts: dict, model_ref: str, data_dir: Path, summary: dict, out: Path,
        overrides: Sequence[str] = ()) -> dict:
    """Draft the test split, score it, write ``out`` (JSON) and log to the model's MLflow run."""
    import mlflow
    import pandas as pd

    from pipelines.report_drafts import draft_split

    if not has_split(data_dir, "test"):
        raise SourceError("--data: the test split is empty")
    ids, drafts, references = [], [], []
    for batch in draft_split(bundle_dir, data_dir, "test", overrides):
        ids += [str(i) for i in batch["image_id"]]
        drafts += [str(t) for t in batch["report"]]
        references += [str(t) for t in batch["reference"]]
    scored = [k for k, r in enumerate(references) if r.strip()]  # a reference without either section scores nothing
    result = {"model": model_ref, "kind": "report", "data_digest": summary.get("digest"), "n_test": len(drafts),
              "n_without_reference": len(drafts) - len(scored),
              "report_generation": score_drafts([drafts[k] for k in scored], [references[k] for k in scored])}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    drafts_csv = out.with_name(f"{out.stem}_drafts.csv")  # beside the metrics: record_id, draft, reference
    pd.DataFrame({"record_id": ids, "report": drafts, "reference": references}).to_csv(drafts_csv, index=False)
    result["drafts_csv"] = str(drafts_csv)
    run_id = facts.get("mlflow_run_id")
    if run_id:
        if facts.get("tracking_uri"):
            mlflow.set_tracking_uri(facts["tracking_uri"])
        rg = result["report_generation"]
        ce = rg["clinical_efficacy"]
        with mlflow.start_run(run_id=run_id):
            tracking.log_dataset(summary, data_dir, context="evaluation", splits=("test",))
            metrics = {"test/report/bleu4": rg["bleu4"], "test/report/rouge_l": rg["rouge_l"],
                       "test/report/findings_and_impression_rate": rg["findings_and_impression_rate"],
                       "test/report/phi_suspect_drafts": rg["phi_suspect_drafts"],
                       "test/report/drafts_ending_mid_sentence": rg["drafts_ending_mid_sentence"]}
            for key in ("f1_micro_14", "f1_macro_14", "f1_micro_5", "f1_macro_5"):
                metrics[f"test/report/{key}"] = ce[key]
            for name, value in ce["per_label_f1"].items():
                if value is not None:
                    metrics[f"test/report/f1/{name.replace(' ', '_')}"] = value
            mlflow.log_metrics({k: v for k, v in metrics.items() if v == v})
            mlflow.log_dict(result, "evaluation/report_generation.json")
            mlflow.log_figure(per_label_f1_figure(ce["per_label_f1"]), "evaluation/report_f1_per_finding.png")
            sample = pd.DataFrame({"record_id": ids, "draft": drafts, "reference": references}).head(N_SAMPLES)
            mlflow.log_table(sample, "evaluation/report_samples.json")
            mlflow.log_text(pd.DataFrame({"record_id": ids, "report": drafts}).to_csv(index=False),
                            "evaluation/test_drafts.csv")
    return result
