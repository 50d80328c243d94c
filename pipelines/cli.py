"""The ``medfuse`` command: synth, ingest, pretrain, finetune, train-report, sweep, evaluate, report, generate, submit, quickstart.

Every sub-command calls the stage's plain ``run(...)`` function, the same one a
``ray job submit -- medfuse ...`` entrypoint runs on a cluster. Input and config errors exit
with code 2 and a message naming the key or argument; nothing is written before validation.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from medfuse_core.config import ConfigError, FinetuneConfig, IngestConfig, PretrainConfig, ReportConfig
from medfuse_core.experiment import load_config
from medfuse_core.data.deid import DeidKeyError
from medfuse_core.data.sources import SourceError
from pipelines.console import UsageError, print_ingest, print_results, with_progress

log = logging.getLogger("medfuse")

REPO_ROOT = Path(__file__).resolve().parents[1]
CPU_EXPERIMENT = REPO_ROOT / "experiments" / "finetune_cxr_cpu.yaml"
EXIT_USAGE = 2
EXIT_HEALTH = 3


def _setup_logging(verbose: bool) -> None:
    from pipelines.runtime import quiet_third_party

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    quiet_third_party()


def cmd_keygen(args) -> int:
    from medfuse_core.data.deid import generate_key_file

    path = generate_key_file(args.out)
    print(f"wrote a new de-identification key to {path} (mode 0600). Keep it outside every output "
          f"folder; point ingest at it with deid.key_file={path} or export MEDFUSE_DEID_KEY.")
    return 0


def cmd_synth(args) -> int:
    from medfuse_core.data.synth import generate_corpus

    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"--out: {out} exists and is not empty")
    if args.studies < 1:
        raise UsageError("--studies: must be at least 1")
    summary = with_progress("synth", lambda cb: generate_corpus(out, n_studies=args.studies, seed=args.seed,
                                                                 progress=cb, tables=args.tables))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _ingest_config(args) -> IngestConfig:
    raw = []
    if args.image_size is not None:
        raw.append(f"image_size={args.image_size}")
    if args.views is not None:
        raw.append(f"views={[v for v in args.views.split(',') if v]}")
    return load_config(args.config, raw + list(args.overrides), schema=IngestConfig)


def cmd_ingest(args) -> int:
    from pipelines import ingest

    cfg = _ingest_config(args)
    summary = ingest.run(args.format, args.root, args.out, cfg)
    print_ingest(summary)
    if args.workdir or os.environ.get("MLFLOW_TRACKING_URI"):
        from medfuse_core.config import flatten
        from pipelines import tracking

        run_id = tracking.log_ingest_run(args.workdir or args.out, summary,
                                         flatten(cfg.model_dump(exclude={"deid"})), args.out)
        print(f"MLflow ingest run: {run_id}")
    return 0


def cmd_finetune(args) -> int:
    from pipelines import finetune

    cfg = load_config(args.config, args.overrides, schema=FinetuneConfig)
    facts = finetune.run(cfg, args.data, args.workdir)
    print(json.dumps({k: facts[k] for k in ("mlflow_run_id", "best_epoch", "best_val_auroc_macro", "model_dir",
                                            "model_uri")}, indent=2))
    return 0


def cmd_pretrain(args) -> int:
    from pipelines import pretrain

    cfg = load_config(args.config, args.overrides, schema=PretrainConfig)
    facts = pretrain.run(cfg, args.data, args.workdir)
    print(json.dumps({k: facts[k] for k in ("mlflow_run_id", "best_epoch", "score_key", "best_score", "model_dir",
                                            "model_uri")}, indent=2))
    return 0


def cmd_train_report(args) -> int:
    from pipelines import train_report

    cfg = load_config(args.config, args.overrides, schema=ReportConfig)
    facts = train_report.run(cfg, args.data, args.workdir)
    print(json.dumps({k: facts[k] for k in ("mlflow_run_id", "best_epoch", "score_key", "best_score", "model_dir",
                                            "model_uri")}, indent=2))
    return 0


def cmd_report(args) -> int:
    from pipelines import report_drafts

    if not Path(args.dicom).is_file():
        raise UsageError(f"--dicom: {args.dicom} is not a file")
    print(report_drafts.report_one(args.model, args.dicom, args.context, args.overrides))
    return 0


def cmd_generate(args) -> int:
    from pipelines import report_drafts

    out = report_drafts.generate(args.model, args.data, args.split, args.out, args.overrides)
    print(json.dumps(out, indent=2))
    return 0


def cmd_sr(args) -> int:
    try:
        from pipelines import structured_report
        import highdicom  # noqa: F401
    except ImportError:
        raise UsageError("medfuse sr needs highdicom: pip install 'medfuse[sr]'") from None
    if not Path(args.dicom).is_file():
        raise UsageError(f"--dicom: {args.dicom} is not a file")
    print(json.dumps(structured_report.write_sr(args.model, args.dicom, args.out, args.context), indent=2))
    return 0


def cmd_predict(args) -> int:
    from pipelines import predict

    fmt = args.format or ("dicom-dir" if Path(args.input).is_dir() and not (Path(args.input) / "files").is_dir()
                          else "mimic-cxr" if Path(args.input).is_dir() else "manifest")
    out = predict.run(args.model, args.input, fmt, args.out, args.overrides)
    print(json.dumps(out, indent=2))
    return 0


def cmd_promote(args) -> int:
    from pipelines import promote

    decision = promote.promote(args.name, args.metric, args.min_gain, os.environ.get("MLFLOW_TRACKING_URI")
                               or (f"sqlite:///{Path(args.workdir).resolve() / 'mlflow.db'}" if args.workdir else None))
    print(json.dumps(decision, indent=2))
    return 0 if decision["promoted"] or decision["reason"] == "already the champion" else 1


def cmd_sweep(args) -> int:
    from medfuse_core.sweep_config import load_sweep
    from pipelines import sweep
    from pipelines.console import print_sweep

    plan = load_sweep(args.config, args.overrides)
    sweep.check_sweep(plan)
    facts = sweep.run(plan, args.data, args.workdir, retry_errored=args.retry_errored)
    print_sweep(facts)
    if not facts.get("best"):
        print(f"medfuse sweep: no trial completed ({json.dumps(facts.get('counts', {}))}); see the trials' "
              f"logs under {args.workdir}/tune", file=sys.stderr)
        return 1
    return 0


def cmd_evaluate(args) -> int:
    from pipelines import evaluate

    result = evaluate.run(args.model, args.data, args.out, log_images=args.log_images, prompts=args.prompts,
                          overrides=args.overrides)
    print_results(result)
    return 0


def cmd_quickstart(args) -> int:
    from pipelines import quickstart

    quickstart.run(args.workdir, studies=args.studies, seed=args.seed, overrides=args.overrides,
                   config=args.config or CPU_EXPERIMENT)
    return 0


def cmd_submit(args) -> int:
    from pipelines import submit

    command = list(args.job)
    if command and command[0] == "--":
        command = command[1:]
    out = submit.submit(command, build_parser(), address=args.address, code=args.code, wait=args.wait, timeout=args.timeout)
    print(out["job_id"])
    if args.wait:
        sys.stdout.write(out.get("logs", "")[-20000:])
        if out["status"] != "SUCCEEDED":
            print(f"medfuse submit: job {out['job_id']} {out['status']}", file=sys.stderr)
            return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medfuse", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("keygen", help="create a secret key file for de-identification pseudonyms")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_keygen)

    p = sub.add_parser("synth", help="write a synthetic chest X-ray corpus in the MIMIC-CXR layout")
    p.add_argument("--out", required=True)
    p.add_argument("--studies", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tables", choices=["gz", "csv"], default="gz",
                   help="label/split/metadata tables as mimic-cxr-2.0.0-*.csv.gz (as released) or plain .csv")
    p.set_defaults(fn=cmd_synth)

    p = sub.add_parser("ingest", help="decode DICOM + reports into Parquet shards on Ray Data")
    p.add_argument("--format", required=True, choices=["mimic-cxr", "manifest"])
    p.add_argument("--root", required=True, help="data root (mimic-cxr) or manifest file (.csv/.parquet)")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=None, help="optional YAML with ingest settings")
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--views", default=None, help="comma-separated ViewPosition values to keep (empty: all)")
    p.add_argument("--workdir", default=None,
                   help="log an MLflow ingest run to this workdir's store (always when MLFLOW_TRACKING_URI is set)")
    p.add_argument("overrides", nargs="*", help="key=value settings")
    p.set_defaults(fn=cmd_ingest)

    p = sub.add_parser("pretrain", help="stage 1: align images and reports (contrastive; Ray Train + DeepSpeed)")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. objective.name=siglip")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("finetune", help="stage 2: train the fusion classifier (Ray Train + DeepSpeed)")
    p.add_argument("--config", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. train.epochs=3 init_from=PRETRAIN_WORKDIR data.label_fraction=0.1")
    p.set_defaults(fn=cmd_finetune)

    p = sub.add_parser("train-report", help="train a report generator: image (+ context) -> FINDINGS + IMPRESSION "
                                            "(Ray Train + DeepSpeed)")
    p.add_argument("--config", required=True, help="e.g. experiments/report_cxr_cpu.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("overrides", nargs="*",
                   help="key=value overrides, e.g. init_from=PRETRAIN_WORKDIR model.lm.lora.r=8 train.epochs=3")
    p.set_defaults(fn=cmd_train_report)

    p = sub.add_parser("report", help="draft the report (FINDINGS + IMPRESSION) for one DICOM file")
    p.add_argument("--model", required=True, help="train-report workdir, bundle folder, MLflow run id or model URI")
    p.add_argument("--dicom", required=True)
    p.add_argument("--context", default=None, help="clinical context (indication) text, if any")
    p.add_argument("overrides", nargs="*", help="decoding.KEY=VALUE, e.g. decoding.num_beams=3")
    p.set_defaults(fn=cmd_report)

    p = sub.add_parser("generate", help="draft a report for every image of a split into a CSV (record_id, report)")
    p.add_argument("--model", required=True, help="train-report workdir, bundle folder, MLflow run id or model URI")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "validate", "test"])
    p.add_argument("--out", required=True, help="CSV file to write")
    p.add_argument("overrides", nargs="*", help="decoding.KEY=VALUE, e.g. decoding.num_beams=3")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("predict", help="batch prediction with a diagnosis model: calibrated probabilities and "
                                       "0/1 findings per image (ingest path in front, Ray Data actor pool)")
    p.add_argument("--model", required=True, help="finetune workdir, bundle folder, MLflow run id or model URI")
    p.add_argument("--input", required=True, help="a folder of DICOM files, a manifest (.csv/.parquet) or a "
                                                  "MIMIC-CXR root")
    p.add_argument("--format", choices=["dicom-dir", "manifest", "mimic-cxr"], default=None,
                   help="default: a folder with files/ is mimic-cxr, another folder dicom-dir, a file a manifest")
    p.add_argument("--out", required=True, help="predictions file: .csv or .parquet")
    p.add_argument("overrides", nargs="*", help="ingest settings key=value, e.g. views=[] (every view)")
    p.set_defaults(fn=cmd_predict)

    p = sub.add_parser("promote", help="move a registered model's 'champion' alias to its 'candidate' when the "
                                       "candidate's validation metric is at least the champion's (exit 1 if not)")
    p.add_argument("--name", required=True, help="registered model name, e.g. medfuse-cxr-diagnosis")
    p.add_argument("--metric", default="best/auroc_macro", help="a metric of the versions' training runs")
    p.add_argument("--min-gain", type=float, default=0.0, help="the candidate must beat the champion by this much")
    p.add_argument("--workdir", default=None, help="the workdir whose MLflow store holds the registry "
                                                   "(default: MLFLOW_TRACKING_URI)")
    p.set_defaults(fn=cmd_promote)

    p = sub.add_parser("sr", help="findings of one DICOM file as a DICOM Comprehensive SR (UNVERIFIED), "
                                  "for a PACS")
    p.add_argument("--model", required=True, help="finetune workdir, bundle folder, MLflow run id or model URI")
    p.add_argument("--dicom", required=True)
    p.add_argument("--out", required=True, help="the SR file to write (.dcm)")
    p.add_argument("--context", default=None, help="clinical context (indication) text, if any")
    p.set_defaults(fn=cmd_sr)

    p = sub.add_parser("sweep", help="Ray Tune sweep over experiment keys (each trial a Ray Train + DeepSpeed run); "
                                     "re-running the same workdir resumes it")
    p.add_argument("--config", required=True, help="sweep file, e.g. experiments/sweep_fusion_cpu.yaml")
    p.add_argument("--data", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("overrides", nargs="*",
                   help="key=value set the base experiment (train.epochs=3); sweep.KEY=VALUE the sweep "
                        "(sweep.num_samples=4, sweep.searcher.name=optuna)")
    p.add_argument("--retry-errored", action="store_true",
                   help="when resuming, run errored trials again from their latest checkpoint")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("evaluate", help="score the test split: diagnosis (image-only and image+text), "
                                        "zero-shot and retrieval for a pretrained model, drafts for a report model")
    p.add_argument("--model", required=True,
                   help="pretrain/finetune workdir, bundle folder, MLflow run id or model URI")
    p.add_argument("--prompts", default=None,
                   help="zero-shot prompt file for a pretrained model (default: experiments/prompts/cxr_zero_shot.yaml)")
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--log-images", action="store_true",
                   help="also log patient images (attention maps over a few test images) to the model's MLflow "
                        "run; off by default, since the store may be shared")
    p.add_argument("overrides", nargs="*", help="report models: decoding.KEY=VALUE, e.g. decoding.num_beams=3")
    p.set_defaults(fn=cmd_evaluate)

    p = sub.add_parser("submit", help="run a medfuse command as a Ray job on a cluster (ray job submit)",
                       description="medfuse submit [--address URL] [--wait] -- <medfuse command and args>")
    p.add_argument("--address", default=None, help="the head's dashboard address, e.g. http://HEAD:8265 "
                                                   "(default: RAY_ADDRESS)")
    p.add_argument("--wait", action="store_true", help="follow the job to its end and print its logs")
    p.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    p.add_argument("--code", action="store_true",
                   help="upload this checkout as the job's working directory (for images without medfuse)")
    p.add_argument("job", nargs=argparse.REMAINDER, help="-- then the medfuse command, e.g. -- finetune --config ...")
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("quickstart", help="synth -> ingest -> finetune -> evaluate on this machine")
    p.add_argument("--workdir", default="runs/quickstart")
    p.add_argument("--studies", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=None)
    p.add_argument("overrides", nargs="*")
    p.set_defaults(fn=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medfuse`` console script."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.fn(args)
    except (ConfigError, SourceError, UsageError, DeidKeyError) as err:
        print(f"medfuse {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except FileNotFoundError:
        print(f"medfuse {args.command}: error: a file or folder named in the arguments was not found",
              file=sys.stderr)
        return EXIT_USAGE
    except Exception as err:
        from pipelines.ingest import IngestHealthError

        if isinstance(err, IngestHealthError):
            print(f"medfuse {args.command}: stopped: {err}", file=sys.stderr)
            return EXIT_HEALTH
        raise


if __name__ == "__main__":
    sys.exit(main())
