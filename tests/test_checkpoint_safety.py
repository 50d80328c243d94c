"""Checkpoints load with torch's weights-only unpickler: tensors and DeepSpeed's few classes, nothing else."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from pipelines.train_loop import weights_only_loading


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_forced_weights_only_rejects_code_in_a_checkpoint(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": _Exploit()}, path)
    with weights_only_loading():
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=False)  # what DeepSpeed asks for; forced to weights-only
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_deepspeed_state_classes_are_allowed(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2), "scaler": LossScaler(1.0), "stage": ZeroStageEnum.gradients}, path)
    with weights_only_loading():
        state = torch.load(path, weights_only=False)
    assert state["stage"] == ZeroStageEnum.gradients and torch.equal(state["w"], torch.ones(2))
