"""The GPU check script's code path, on CPU (`--smoke`): ZeRO-3 over a causal LM with LoRA."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_gpu_check_smoke_runs_zero3_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, env={**__import__("os").environ,
                                                                            "MASTER_PORT": "29613"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["zero_stage"] == 3 and result["flops_per_step"] > 0 and result["samples_per_sec"] > 0
    assert 0 < result["trained_params"] < result["params"]  # the LM base is frozen, its adapters train
