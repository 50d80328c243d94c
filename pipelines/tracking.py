"""MLflow helpers: where the store is, experiments, PHI-free params, model logging.

Default store: an SQLite database under the workdir (``sqlite:///<workdir>/mlflow.db``) with
artifacts under ``<workdir>/mlartifacts``; ``MLFLOW_TRACKING_URI`` overrides it (a shared
``mlflow server`` on a cluster).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger("medfuse")

MODEL_CODE = Path(__file__).with_name("mlflow_model.py")


def tracking_uri(workdir: str | Path) -> str:
    """The tracking URI in force: MLFLOW_TRACKING_URI, else an SQLite store under ``workdir``."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = Path(workdir).resolve() / "mlflow.db"
    return f"sqlite:///{db}"


def is_local_store(uri: str) -> bool:
    """True for SQLite/file stores, False for a tracking server: only picks where a new
    experiment keeps its artifacts. A string guess (a SQLite file may sit on a shared disk,
    ``databricks`` counts as local), so never a gate for patient data: images are logged only
    on an explicit opt-in (``medfuse evaluate --log-images``)."""
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def setup(workdir: str | Path, experiment: str) -> str:
    """Point MLflow at the store and experiment; return the experiment id."""
    import mlflow

    uri = tracking_uri(workdir)
    Path(workdir).mkdir(parents=True, exist_ok=True)
    user_env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # mlflow also exports both URIs to the environment; keep the user's settings (or their
    # absence) so a later stage with another workdir does not inherit this store
    for key, value in user_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        artifact_location = None
        if is_local_store(uri):
            artifact_location = (Path(workdir).resolve() / "mlartifacts").as_uri()
        exp_id = mlflow.create_experiment(experiment, artifact_location=artifact_location)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def log_params_flat(params: dict[str, Any]) -> None:
    """Log flattened params, values stringified and cut to MLflow's length limit."""
    import mlflow

    clean = {}
    for key, value in params.items():
        text = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        clean[key] = text[:6000]
    mlflow.log_params(clean)


def log_dataset(summary: dict, data_dir: str | Path, context: str, splits=None) -> None:
    """Log the ingested dataset (name, digest and source only: no records) as a run input.

    ``splits`` (e.g. ``("validate", "test")``) names the part that was read; it goes into the
    dataset name, so an evaluation of the data a run trained on is still recorded (MLflow
    keeps one input per dataset name and digest on a run, whatever the context)."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    source = LocalArtifactDatasetSource(str(Path(data_dir).resolve()))
    name = summary.get("dataset_name", "medfuse-shards")
    if splits:
        name = f"{name}[{'+'.join(splits)}]"
    dataset = MetaDataset(source=source, name=name, digest=summary["digest"][:36])
    mlflow.log_input(dataset, context=context)


def log_ingest(summary: dict) -> None:
    """Ingest accounting as metrics: counts, quarantine/filter per reason, de-identification audit."""
    import mlflow

    metrics = {f"ingest/{k}": summary[k] for k in ("n_records", "n_ok", "n_quarantined", "n_filtered", "n_images",
                                                    "patients_in_several_splits") if k in summary}
    for group, key in (("quarantined", "quarantine_by_reason"), ("filtered", "filtered_by_reason"),
                       ("deid", "deid_audit")):
        for reason, count in (summary.get(key) or {}).items():
            metrics[f"ingest/{group}/{reason}"] = count
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.log_dict({k: v for k, v in summary.items() if k not in ("quarantine", "filtered")},
                    "data/ingest_summary.json")


def log_ingest_run(workdir: str | Path, summary: dict, params: dict, data_dir: str | Path,
                   experiment: str = "medfuse-ingest") -> str:
    """One MLflow run for an ingest: settings, accounting metrics, the dataset as an output."""
    import mlflow

    setup(workdir, experiment)
    with mlflow.start_run(run_name=f"ingest-{summary['format']}") as run:
        mlflow.set_tag("medfuse.stage", "ingest")
        log_params_flat(params)
        log_ingest(summary)
        log_dataset(summary, data_dir, context="ingest")
        return run.info.run_id


# what the served model imports (medfuse_core itself travels as code, not as a requirement)
SERVING_DISTRIBUTIONS = ("torch", "torchvision", "transformers", "safetensors", "tokenizers", "peft", "pydicom",
                         "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                         "opencv-python-headless", "numpy", "pandas", "scipy", "scikit-learn", "pydantic", "pyyaml")


def serving_requirements() -> list[str]:
    """Pinned requirements of the served model: the installed versions of what it imports."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for name in SERVING_DISTRIBUTIONS:
        try:
            out.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return out


def model_signature(bundle_dir: str | Path):
    """The pyfunc signature of a bundle: ``dicom`` bytes + optional ``context`` in; out, per kind,
    ``prob:``/``pred:`` per finding (diagnosis), ``embedding`` (stage 1) or ``report``, and ``error``."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    from medfuse_core.models.bundle import read_bundle_meta

    meta = read_bundle_meta(bundle_dir)
    inputs = Schema([ColSpec("binary", "dicom"), ColSpec("string", "context", required=False)])
    kind = meta.get("kind", "diagnosis")
    if kind == "report":
        outputs = Schema([ColSpec("string", "report"), ColSpec("string", "error")])
    elif kind == "contrastive":
        return ModelSignature(inputs=inputs)  # an embedding per row (a list column)
    else:
        labels = meta["label_names"]
        outputs = Schema([ColSpec("string", "record_id"), ColSpec("long", "context_used")]
                         + [ColSpec("double", f"prob:{n}") for n in labels]
                         + [ColSpec("long", f"pred:{n}") for n in labels] + [ColSpec("string", "error")])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(bundle_dir: str | Path, registered_model: str | None, input_example=None) -> Any:
    """Log a model bundle as an MLflow pyfunc model (models-from-code, ``medfuse_core`` as its
    code, pinned requirements that resolve from a package index), register it, alias ``candidate``."""
    import mlflow

    import medfuse_core

    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(MODEL_CODE),
        artifacts={"bundle": str(bundle_dir)},
        code_paths=[str(Path(medfuse_core.__file__).parent)],
        pip_requirements=serving_requirements(),
        signature=model_signature(bundle_dir),
        input_example=input_example,
        registered_model_name=registered_model,
    )
    if registered_model:
        client = mlflow.MlflowClient()
        versions = client.search_model_versions(f"name='{registered_model}'")
        mine = [v for v in versions if v.run_id == info.run_id]
        if mine:
            latest = max(mine, key=lambda v: int(v.version))
            client.set_registered_model_alias(registered_model, "candidate", latest.version)
    return info


def bundle_dir_from_model_uri(uri: str, dst: str | Path) -> Path:
    """Download a logged medfuse pyfunc model and return the path of its bundle folder."""
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    found = sorted(local.glob("artifacts/*/medfuse_model.json"))
    if not found:
        raise FileNotFoundError(f"model {uri} holds no medfuse bundle")
    return found[0].parent
