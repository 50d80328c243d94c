"""``medfuse submit``: run a medfuse command as a Ray job on a cluster (``ray job submit``).

The job's entrypoint is the medfuse command itself; its runtime environment carries what every
medfuse job needs (offline Hugging Face, no progress bars in the job log, the submitter's
``MLFLOW_TRACKING_URI`` when set) and, with ``--code``, this checkout as the working directory
(for clusters whose image does not have medfuse installed). Secrets (the de-identification key,
MLflow credentials) are never put in the runtime environment, which the dashboard shows: the
cluster gets them from its own secrets. Ray 2.60 heads use token authentication; the token is
read the way Ray reads it (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``).
"""

from __future__ import annotations

import os
import shlex
import time
from pathlib import Path

from pipelines.console import UsageError

REPO = Path(__file__).resolve().parents[1]
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_EXPERIMENT_NAME")
CODE_EXCLUDES = [".git/", "runs/", "mlruns/", "*.db", "mlartifacts/", "__pycache__/", ".venv/"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 90  # how long to wait for a freshly started head's job agent


def runtime_env(code: bool) -> dict:
    """The runtime environment of a medfuse job."""
    env_vars = {"HF_HUB_OFFLINE": "1", "MEDFUSE_PROGRESS": "0"}
    env_vars.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    out: dict = {"env_vars": env_vars}
    if code:
        out["working_dir"] = str(REPO)
        out["excludes"] = CODE_EXCLUDES
    return out


def entrypoint(command: list[str], parser) -> str:
    """``medfuse <command ...>`` as one shell-quoted string, checked against the CLI's ``parser``."""
    if not command:
        raise UsageError("give the medfuse command to run after --, e.g. "
                         "`medfuse submit -- finetune --config experiments/finetune_cxr_gpu.yaml --data D --workdir W`")
    if command[0] == "medfuse":
        command = command[1:]
    if command and command[0] == "submit":
        raise UsageError("a submitted job cannot submit another; give the command to run, e.g. `-- finetune ...`")
    try:
        parser.parse_args(command)
    except SystemExit:
        raise UsageError(f"`medfuse {shlex.join(command)}` is not a valid medfuse command; "
                         "check it with `medfuse --help`") from None
    return shlex.join(["medfuse", *command])


def submit(command: list[str], parser, address: str | None = None, code: bool = False, wait: bool = False,
           timeout: float | None = None, echo=print) -> dict:
    """Submit ``medfuse <command>`` (checked against ``parser``) to the Ray cluster at ``address`` (``RAY_ADDRESS`` when None);
    with ``wait``, follow it to the end. Returns ``{"job_id", "status", "logs"?}``."""
    from ray.job_submission import JobSubmissionClient

    line = entrypoint(command, parser)
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UsageError("--address: give the Ray head's dashboard address (e.g. --address http://HEAD:8265) "
                         "or export RAY_ADDRESS")
    client = JobSubmissionClient(address)
    metadata = {"medfuse.command": command[0] if command[0] != "medfuse" else command[1]}
    deadline = time.time() + AGENT_WAIT_S
    while True:
        try:
            job_id = client.submit_job(entrypoint=line, runtime_env=runtime_env(code), metadata=metadata)
            break
        except RuntimeError as err:  # a head that has just started has no job agent for a few seconds
            if "No available agent" not in str(err) or time.time() > deadline:
                raise
            time.sleep(2)
    echo(f"medfuse submit: job {job_id} submitted to {address}: {line}")
    out = {"job_id": job_id, "status": str(client.get_job_status(job_id).value)}
    if not wait:
        echo(f"follow it with `ray job logs --address {address} --follow {job_id}`")
        return out
    started, status = time.time(), out["status"]
    while status not in TERMINAL:
        if timeout is not None and time.time() - started > timeout:
            raise TimeoutError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(2)
        new = str(client.get_job_status(job_id).value)
        if new != status:
            echo(f"medfuse submit: job {job_id} {new}")
        status = new
    out.update(status=status, logs=client.get_job_logs(job_id))
    return out
