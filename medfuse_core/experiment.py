"""Loading an experiment: the schema (:mod:`medfuse_core.config`) plus the registry names.

``config`` knows nothing of models; this module checks every registry name in a loaded
config against the registries (vision encoders, fusion modules, objectives), so a typo fails
at load time with a :class:`~medfuse_core.config.ConfigError` naming the dotted key.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from medfuse_core.config import ConfigError, FinetuneConfig, parse_config


def registry_problems(cfg: BaseModel) -> list[str]:
    """``"dotted.key: problem"`` for every registry name in ``cfg`` that is not registered."""
    from medfuse_core.models import FUSION_MODULES, VISION_ENCODERS
    from medfuse_core.objectives import OBJECTIVES

    problems = []
    model = getattr(cfg, "model", None)
    checks = []
    if model is not None and getattr(model, "vision", None) is not None:
        checks.append(("model.vision.name", model.vision.name, VISION_ENCODERS))
    if model is not None and getattr(model, "connector", None) is not None:
        from medfuse_core.models.report import CONNECTORS

        checks.append(("model.connector.name", model.connector.name, CONNECTORS))
    if model is not None and getattr(model, "fusion", None) is not None:
        checks.append(("model.fusion.name", model.fusion.name, FUSION_MODULES))
    for key, name, registry in checks:
        if name not in registry:
            problems.append(f"{key}: unknown {registry.kind} {name!r}; choose one of {registry.names()}")
    objective = getattr(cfg, "objective", None)
    if objective is not None:
        from medfuse_core.config import STAGE_SCHEMAS

        stage = next((k for k, v in STAGE_SCHEMAS.items() if isinstance(cfg, v)), "finetune")
        names = [n for n in OBJECTIVES.names() if OBJECTIVES.get(n).stage == stage]
        if objective.name not in names:
            problems.append(f"objective.name: {objective.name!r} is not a {stage} objective; choose one of {names}")
    return problems


def load_config(path: str | Path | None, overrides=(), schema: type[BaseModel] = FinetuneConfig):
    """Load a YAML experiment (or the defaults), apply ``key=value`` overrides, validate the
    schema and every registry name; raises :class:`ConfigError` naming the key."""
    cfg = parse_config(path, list(overrides), schema)
    problems = registry_problems(cfg)
    if problems:
        source = str(path) if path is not None else "defaults"
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(problems))
    return cfg
