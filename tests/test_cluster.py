"""The cluster files are consistent with the code: versions, entrypoints, experiment files."""

from __future__ import annotations

import shlex
from pathlib import Path

import ray
import yaml

from medfuse_core.experiment import load_config
from pipelines.cli import build_parser

CLUSTER = Path(__file__).resolve().parents[1] / "cluster"
REPO = CLUSTER.parent


def _load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def test_kuberay_manifests_match_installed_ray():
    cluster = _load("raycluster.yaml")
    job = _load("rayjob-finetune.yaml")
    assert cluster["kind"] == "RayCluster" and job["kind"] == "RayJob"
    assert cluster["apiVersion"] == job["apiVersion"] == "ray.io/v1"
    assert cluster["spec"]["rayVersion"] == job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    assert f"rayproject/ray:{ray.__version__}" in (CLUSTER / "Dockerfile").read_text()
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        workers = spec["workerGroupSpecs"]
        assert any("nvidia.com/gpu" in c["resources"]["limits"] for w in workers
                   for c in w["template"]["spec"]["containers"])


def test_rayjob_entrypoint_is_a_valid_medfuse_command():
    job = _load("rayjob-finetune.yaml")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[0] == "medfuse"
    args = build_parser().parse_args(argv[1:])
    assert args.command == "finetune"
    experiment = REPO / Path(args.config).relative_to("/opt/medfuse")
    cfg = load_config(experiment, args.overrides)
    assert cfg.scaling.use_gpu and cfg.scaling.num_workers >= 2


def test_ray_up_file_has_head_and_gpu_workers():
    cfg = _load("ray-up.yaml")
    assert cfg["head_node_type"] in cfg["available_node_types"]
    assert cfg["docker"]["image"].startswith("medfuse:")
    assert (CLUSTER / "submit.sh").stat().st_mode & 0o111
