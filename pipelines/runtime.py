"""Process-level set-up shared by every pipeline: Ray start-up, worker environment, logging."""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger("medfuse")

# Environment every Ray worker gets: offline model loading, quiet tokenizers, CPU DeepSpeed
# when no GPU is in use.
_WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_CHDIR_TO_TRIAL_DIR": "0",  # sweep trials keep the job's working dir: relative paths hold
    "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


def worker_env() -> dict[str, str]:
    """Environment variables for Ray workers (``runtime_env['env_vars']``); DeepSpeed's
    accelerator is chosen per training run inside the workers."""
    return dict(_WORKER_ENV)


def quiet_third_party() -> None:
    """Silence third-party warnings that echo values or paths (pydicom) and noisy loggers."""
    for key, value in _WORKER_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", module="pydicom")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    for name in ("pydicom", "urllib3", "alembic", "mlflow.store.db.utils", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


def _env_not_set_by_job(env: dict[str, str]) -> dict[str, str]:
    """Inside a Ray job (``ray job submit`` / ``medfuse submit``), the variables the job's runtime env
    does not set already: Ray refuses to merge a driver's runtime env that repeats a job's key."""
    import json

    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return env
    try:
        job_env = (json.loads(raw).get("runtime_env") or {}).get("env_vars") or {}
    except (ValueError, AttributeError):
        return env
    return {k: v for k, v in env.items() if k not in job_env}


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster named by RAY_ADDRESS, or start a local one.

    Inside ``ray job submit`` the driver already has RAY_ADDRESS set and joins that cluster.
    """
    import ray

    if ray.is_initialized():
        return
    quiet_third_party()
    kwargs = dict(
        runtime_env={"env_vars": _env_not_set_by_job(worker_env())},
        log_to_driver=True,
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    if not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.max_errored_blocks = 0  # never drop data silently: records are quarantined one by one
    ctx.enable_progress_bars = os.environ.get("MEDFUSE_PROGRESS", "1") != "0"
    ctx.print_on_execution_start = False


def quiet_data_progress() -> None:
    """Turn Ray Data progress bars off for datasets created from now on (training streams)."""
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False


CPUS_PER_SCORER = 4  # torch intra-op threads per CPU scoring actor (fewer on a small cluster)


def scorer_resources(cluster: dict) -> dict:
    """Actor-pool size and per-actor resources for scoring, from ``ray.cluster_resources()``.

    With GPUs: one actor per GPU (``num_gpus=1``) and a few CPUs each for decoding and
    tokenising. CPU only: actors of up to :data:`CPUS_PER_SCORER` CPUs, as many as fit. Either
    way some CPUs stay free for the Parquet read tasks (actors holding every CPU starve the
    reads and the pipeline hangs). ``threads`` is the torch thread count matching an actor's CPUs.
    """
    cpus = int(cluster.get("CPU", 0))
    gpus = int(cluster.get("GPU", 0))
    spare = max(1, cpus // 8)
    budget = max(1, cpus - spare)
    if gpus >= 1:
        per = max(1, min(CPUS_PER_SCORER, budget // gpus))
        return {"min_size": 1, "max_size": gpus, "num_cpus": per, "num_gpus": 1, "threads": per}
    per = max(1, min(CPUS_PER_SCORER, budget))
    return {"min_size": 1, "max_size": max(1, budget // per), "num_cpus": per, "num_gpus": 0, "threads": per}
