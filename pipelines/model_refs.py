"""Finding a model bundle from what a user passes: a stage workdir, a bundle folder, an MLflow
run id, or a model URI (``models:/name@alias``, ``runs:/id/model``)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipelines import tracking

STAGE_FACTS = {"finetune.json": "finetune", "pretrain.json": "pretrain", "report.json": "train-report"}


def resolve_model(ref: str, tmp: Path, option: str = "--model") -> tuple[Path, dict]:
    """The bundle folder for ``ref`` and the tracking facts known about it (run id, store, stage)."""
    path = Path(ref)
    if path.is_dir():
        for name in STAGE_FACTS:
            if (path / name).is_file():
                facts = json.loads((path / name).read_text())
                if not (path / "model" / "medfuse_model.json").is_file():
                    raise FileNotFoundError(f"{option}: {ref} holds no trained model yet (model/ is missing); "
                                            f"finish the run with `medfuse {STAGE_FACTS[name]} ... --workdir {ref}`")
                return path / "model", facts
        if (path / "medfuse_model.json").is_file():
            return path, {}
        raise FileNotFoundError(f"{option}: {ref} is neither a pretrain, finetune or train-report workdir nor a model bundle")
    uri = ref if re.match(r"^[a-z]+:/", ref) else f"runs:/{ref}/model"
    bundle = tracking.bundle_dir_from_model_uri(uri, tmp)
    facts = {"model_uri": uri}
    m = re.match(r"^runs:/([0-9a-f]+)/", uri)
    if m:
        facts["mlflow_run_id"] = m.group(1)
    return bundle, facts
