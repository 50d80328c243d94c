"""``medfuse quickstart``: synth -> ingest -> finetune -> evaluate on one machine, with progress."""

from __future__ import annotations

import json
import time
from pathlib import Path

from medfuse_core.config import FinetuneConfig, IngestConfig, flatten
from medfuse_core.experiment import load_config

DEFAULT_STUDIES = 1000


def run(workdir: str | Path, studies: int | None = None, seed: int = 0, overrides=(), config=None) -> dict:
    """Run the whole chain under ``workdir``; prints a results table and where to look in MLflow."""
    from rich.console import Console

    from medfuse_core.data.synth import SYNTHETIC_MARKER, generate_corpus
    from pipelines import evaluate, finetune, ingest, tracking
    from pipelines.console import print_ingest, print_results, with_progress

    console = Console()
    cfg = load_config(config, list(overrides), schema=FinetuneConfig)  # validate before any work
    workdir = Path(workdir).resolve()
    corpus, data, train_dir = workdir / "corpus", workdir / "data", workdir / "train"
    timings = {}
    t_all = time.time()

    def stage(n: int, title: str) -> float:
        console.rule(f"[bold]step {n}/4: {title}")
        return time.time()

    t = stage(1, "synthesise a chest X-ray corpus (MIMIC-CXR layout)")
    if not (corpus / SYNTHETIC_MARKER).exists():
        with_progress("synth", lambda cb: generate_corpus(corpus, n_studies=studies or DEFAULT_STUDIES,
                                                           seed=seed, progress=cb))
    else:
        console.print(f"corpus exists at {corpus}; reusing it")
    timings["synth"] = time.time() - t

    t = stage(2, "ingest on Ray Data")
    if not (data / ingest.SUMMARY_NAME).exists():
        ingest_cfg = IngestConfig(image_size=cfg.data.image_size)
        summary = ingest.run("mimic-cxr", corpus, data, ingest_cfg)
        tracking.log_ingest_run(train_dir, summary, flatten(ingest_cfg.model_dump(exclude={"deid"})), data)
    else:
        summary = ingest.load_summary(data)
        console.print(f"shards exist at {data}; reusing them")
    print_ingest(summary)
    timings["ingest"] = time.time() - t

    t = stage(3, f"fine-tune {cfg.model.fusion.name} fusion (Ray Train x{cfg.scaling.num_workers}, "
                 f"DeepSpeed ZeRO-{cfg.deepspeed.zero_stage})")
    facts = finetune.run(cfg, data, train_dir)
    timings["finetune"] = time.time() - t

    t = stage(4, "evaluate on the test split")
    result = evaluate.run(str(train_dir), data, workdir / "metrics.json")
    timings["evaluate"] = time.time() - t
    timings["total"] = time.time() - t_all

    print_results(result)
    console.print("timings (s): " + json.dumps({k: round(v, 1) for k, v in timings.items()}))
    console.print(f"metrics: {workdir / 'metrics.json'}")
    console.print(f"MLflow: mlflow ui --backend-store-uri {facts['tracking_uri']}  "
                  f"(experiment '{facts['experiment']}', run {facts['mlflow_run_id']})")
    (workdir / "quickstart.json").write_text(json.dumps({"timings": timings, "facts": facts}, indent=2, default=str))
    return result
