"""The objective registry. The objective modules register into it; the package's ``__init__``
imports them, so any import of ``medfuse_core.objectives...`` sees every objective."""

from __future__ import annotations

from medfuse_core.registry import Registry

OBJECTIVES: Registry = Registry("objective")


def build_objective(cfg):
    """The objective ``cfg.objective.name`` names, bound to the experiment ``cfg``."""
    return OBJECTIVES.get(cfg.objective.name)(cfg)
