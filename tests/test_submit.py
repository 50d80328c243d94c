"""`medfuse submit` against a real Ray head (token authentication on): a tiny finetune as a Ray job."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipelines.cli import build_parser, main
from pipelines.console import UsageError
from pipelines.submit import entrypoint, runtime_env
from tests.conftest import CPU_EXPERIMENT, REPO, TINY_OVERRIDES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_is_checked_and_quoted():
    line = entrypoint(["finetune", "--config", "a b.yaml", "--data", "D", "--workdir", "W", "train.lr=1e-3"],
                      build_parser())
    assert line == "medfuse finetune --config 'a b.yaml' --data D --workdir W train.lr=1e-3"
    for bad in ([], ["submit", "--", "finetune"], ["finetune", "--no-such-flag"], ["no-such-command"]):
        with pytest.raises(UsageError):
            entrypoint(bad, build_parser())


def test_runtime_env_forwards_tracking_not_secrets(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "00" * 32)
    env = runtime_env(code=True)
    assert env["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert "MEDFUSE_DEID_KEY" not in json.dumps(env)
    assert env["working_dir"] == str(REPO) and ".git/" in env["excludes"]


@pytest.mark.slow
@pytest.mark.heavy
def test_submit_a_tiny_finetune_to_a_token_authenticated_head(tiny_data, capsys):
    temp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's socket paths live under it
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--num-cpus", "2",
                           "--port", str(_free_port()), "--dashboard-port", str(dashboard),
                           # every port its own: the session's cluster already holds Ray's defaults (52365, ...)
                           "--dashboard-agent-listen-port", str(_free_port()),
                           "--dashboard-agent-grpc-port", str(_free_port()),
                           "--metrics-export-port", str(_free_port()),
                           "--runtime-env-agent-port", str(_free_port()),
                           "--ray-client-server-port", str(_free_port()),
                           "--include-dashboard", "true", "--temp-dir", temp, "--disable-usage-stats"],
                          env=env, capture_output=True, text=True, timeout=180)
    assert head.returncode == 0, head.stdout + head.stderr
    workdir = Path(temp) / "w"
    try:
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 60
        code = None
        while time.time() < deadline:  # the job agent comes up a moment after `ray start` returns
            try:
                code = main(["submit", "--address", address, "--wait", "--timeout", "900", "--",
                             "finetune", "--config", str(CPU_EXPERIMENT), "--data", str(tiny_data),
                             "--workdir", str(workdir), *TINY_OVERRIDES, "train.epochs=1"])
                break
            except ConnectionError:
                time.sleep(2)
        out = capsys.readouterr().out
        assert code == 0, out[-4000:]
        assert any(line.startswith("raysubmit_") for line in out.splitlines())  # the job id, on its own line
        assert "[medfuse] epoch 1/1" in out  # the job's own log, read back through the job server
        facts = json.loads((workdir / "finetune.json").read_text())
        assert facts["model_uri"] and (workdir / "model" / "medfuse_model.json").is_file()
    finally:
        _stop_head(temp)
        shutil.rmtree(temp, ignore_errors=True)


def _stop_head(temp: str) -> None:
    """Stop only the head started under ``temp`` (``ray stop`` would stop every Ray on the machine)."""
    import psutil

    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if any(temp in part for part in proc.info["cmdline"] or []):
                proc.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue


def test_driver_inside_a_job_does_not_repeat_the_jobs_env_keys(monkeypatch):
    """Ray refuses a driver runtime env that repeats a key of the job's runtime env."""
    from pipelines.runtime import _env_not_set_by_job, worker_env

    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": runtime_env(code=False)}))
    env = _env_not_set_by_job(worker_env())
    assert "HF_HUB_OFFLINE" not in env and set(env) < set(worker_env())
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert _env_not_set_by_job(worker_env()) == worker_env()
