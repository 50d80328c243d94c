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


def _pod_specs():
    cluster = _load("raycluster.yaml")["spec"]
    job = _load("rayjob-finetune.yaml")["spec"]["rayClusterSpec"]
    for spec in (cluster, job):
        yield spec["headGroupSpec"]["template"]["spec"]
        for group in spec["workerGroupSpecs"]:
            yield group["template"]["spec"]


def test_pods_take_auth_and_tracking_credentials_from_secrets():
    for pod in _pod_specs():
        for container in pod["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            for name in ("RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
                         "MLFLOW_TRACKING_PASSWORD", "MEDFUSE_DEID_KEY"):
                assert "secretKeyRef" in env[name]["valueFrom"], name  # never a literal in the manifest
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            assert "/data" in mounts


def test_claimed_volumes_exist_and_the_data_volume_is_shared():
    claims = {doc["metadata"]["name"]: doc for doc in yaml.safe_load_all((CLUSTER / "storage.yaml").read_text())}
    assert "ReadWriteMany" in claims["medfuse-data"]["spec"]["accessModes"]
    for pod in _pod_specs():
        for volume in pod["volumes"]:
            assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_every_referenced_file_exists():
    import re

    for path in [*CLUSTER.iterdir(), REPO / "docs" / "scaling.md", REPO / "README.md"]:
        if not path.is_file():
            continue
        text = path.read_text()
        for ref in re.findall(r"(?:experiments|benchmarks|cluster)/[\w./-]+\.(?:yaml|py|sh)", text):
            assert (REPO / ref).exists(), f"{path.name} names {ref}, which does not exist"
    for line in (CLUSTER / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (REPO / src).exists(), f"Dockerfile copies {src}, which does not exist"


def test_ray_up_mounts_shared_storage_and_passes_tracking_and_auth():
    cfg = _load("ray-up.yaml")
    options = " ".join(cfg["docker"]["run_options"])
    assert ":/data" in options and "MLFLOW_TRACKING_URI" in options and "RAY_AUTH_MODE=token" in options
    assert any("mount" in c for c in cfg["initialization_commands"])
