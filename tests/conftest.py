"""Shared fixtures: one real local Ray cluster per test session, a tiny synthetic corpus and its shards."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MEDFUSE_PROGRESS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
CPU_EXPERIMENT = REPO / "experiments" / "finetune_cxr_cpu.yaml"

# A tiny but real training set-up: real MiniLM (frozen), real ResNet-18 at 32 px, 2 workers.
TINY_OVERRIDES = [
    "data.image_size=48",
    "model.text.max_tokens=16",
    "model.text.trainable_layers=0",
    "model.fusion.dim=32",
    "model.fusion.heads=2",
    "train.batch_size=8",
    "train.epochs=2",
    "train.warmup_steps=2",
    "train.log_every_steps=2",
    "train.lr=3e-3",
    # the distributed path (two workers, gloo all-reduce, ZeRO partitions) whatever the shipped
    # CPU experiment's worker count
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
    "scaling.torch_threads=1",
]


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray cluster (2 CPUs), started once."""
    import ray

    from pipelines.runtime import init_ray

    init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> Path:
    from medfuse_core.data.synth import generate_corpus

    root = tmp_path_factory.mktemp("corpus")
    generate_corpus(root, n_studies=90, seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_data(ray_local, tiny_corpus, tmp_path_factory) -> Path:
    from medfuse_core.config import IngestConfig
    from pipelines import ingest

    out = tmp_path_factory.mktemp("ingest") / "data"
    ingest.run("mimic-cxr", tiny_corpus, out, IngestConfig(image_size=48))
    return out
