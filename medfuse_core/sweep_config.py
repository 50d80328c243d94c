"""A sweep experiment: a stage's base experiment plus a search space over its dotted keys.

A sweep file names the stage, the base experiment (a path relative to the sweep file), fixed
overrides for every trial, and the ``sweep`` section: metric, mode, number of trials, the
scheduler and searcher by name, and ``space``, a mapping from a dotted key of the base
experiment to one of ``choice: [..]``, ``grid: [..]``, ``uniform: [low, high]``,
``loguniform: [low, high]`` or ``randint: [low, high)``. Every value a trial can draw (both
ends of a range) is checked against the stage's schema at load time, so a bad space fails
before any trial starts, with a :class:`~medfuse_core.config.ConfigError` naming the key.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, ValidationError, model_validator

from medfuse_core.config import (STAGE_SCHEMAS, ConfigError, _format_validation_error, _Section, apply_overrides,
                                 flatten, parse_override, read_yaml_mapping)

KINDS = ("choice", "grid", "uniform", "loguniform", "randint")


class SpaceEntry(_Section):
    """One swept key: exactly one of the kinds."""

    choice: Optional[list[Any]] = Field(None, min_length=1)
    grid: Optional[list[Any]] = Field(None, min_length=1)
    uniform: Optional[list[float]] = Field(None, min_length=2, max_length=2)
    loguniform: Optional[list[float]] = Field(None, min_length=2, max_length=2)
    randint: Optional[list[int]] = Field(None, min_length=2, max_length=2)

    @model_validator(mode="after")
    def _one_kind(self) -> "SpaceEntry":
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(KINDS)} (got {given or 'none'})")
        kind = given[0]
        if kind in ("uniform", "loguniform", "randint"):
            low, high = getattr(self, kind)
            if not low < high:
                raise ValueError(f"{kind}: low ({low}) must be below high ({high})")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low ({low}) must be above 0")
        return self

    @property
    def kind(self) -> str:
        """The distribution's name."""
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def args(self) -> list:
        """The values (choice, grid) or the range ends."""
        return list(getattr(self, self.kind))

    def edge_values(self) -> list:
        """Every value a trial may draw for a discrete kind; both ends of a range."""
        if self.kind == "randint":
            return [self.randint[0], self.randint[1] - 1]  # high is exclusive
        if self.kind in ("uniform", "loguniform"):  # and a fractional draw: refused by an int field
            low, high = self.args
            return [low, high, low + 0.37 * (high - low)]
        return self.args


class SchedulerConfig(_Section):
    """Trial scheduler, a name from ``pipelines.sweep.SCHEDULERS`` (``asha``, ``fifo``)."""

    name: str = "asha"
    grace_period: int = Field(1, ge=1)  # epochs every trial gets before it can be stopped
    reduction_factor: float = Field(2.0, gt=1.0)


class SearcherConfig(_Section):
    """Search algorithm, a name from ``pipelines.sweep.SEARCHERS`` (``random``, ``optuna``)."""

    name: str = "random"
    seed: int = 0


class SweepSection(_Section):
    metric: Optional[str] = None  # default: the stage objective's checkpoint score, e.g. val/auroc_macro
    mode: Literal["max", "min"] = "max"
    num_samples: int = Field(8, ge=1)  # trials (with grid entries: repeats of the whole grid)
    max_concurrent_trials: int = Field(0, ge=0)  # 0: as many as the cluster's CPUs (GPUs) hold
    scheduler: SchedulerConfig = SchedulerConfig()
    searcher: SearcherConfig = SearcherConfig()
    alias: str = Field("sweep-best", min_length=1)  # registry alias of the best trial's model
    space: dict[str, SpaceEntry] = Field(min_length=1)


class SweepConfig(_Section):
    """A sweep experiment file."""

    name: str = "sweep"
    stage: Literal["finetune", "pretrain", "report"] = "finetune"
    base: Optional[str] = None  # the base experiment, relative to the sweep file (None: the stage's defaults)
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted key -> value, fixed for every trial
    sweep: SweepSection


@dataclass
class Sweep:
    """A loaded sweep: its config, the base experiment as a raw mapping (overrides applied) and
    that experiment validated."""

    config: SweepConfig
    base_raw: dict
    base: BaseModel

    @property
    def stage(self) -> str:
        return self.config.stage


def _set(raw: dict, dotted: str, value) -> dict:
    """A copy of ``raw`` with the dotted key set to ``value`` (sections created as needed)."""
    out = copy.deepcopy(raw)
    node = out
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value
    return out


def trial_raw(base_raw: dict, params: dict) -> dict:
    """The base experiment with one trial's drawn values set."""
    raw = base_raw
    for key, value in params.items():
        raw = _set(raw, key, value)
    return raw


def validate_stage(raw: dict, stage: str, source: str) -> BaseModel:
    """Validate a raw experiment mapping against the stage's schema and registries."""
    from medfuse_core.experiment import registry_problems

    try:
        cfg = STAGE_SCHEMAS[stage].model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None
    problems = registry_problems(cfg)
    if problems:
        raise ConfigError(f"invalid configuration ({source}):\n  " + "\n  ".join(problems))
    return cfg


def _split_overrides(overrides) -> tuple[list[str], list[str]]:
    """``sweep.*`` overrides set the sweep file; every other ``key=value`` the base experiment."""
    mine, base = [], []
    for text in overrides:
        (mine if text.split("=", 1)[0].strip().split(".")[0] in ("sweep", "name", "stage", "base") else base).append(text)
    return mine, base


def load_sweep(path: str | Path, overrides=()) -> Sweep:
    """Load and check a sweep file; ``key=value`` overrides set the base experiment, ``sweep.KEY=V``
    the sweep section. Raises :class:`ConfigError` naming the key."""
    p = Path(path)
    raw = read_yaml_mapping(p)
    mine, base_overrides = _split_overrides(overrides)
    space_overrides = [t for t in mine if t.split("=", 1)[0].strip().startswith("sweep.space.")]
    raw = apply_overrides(raw, [t for t in mine if t not in space_overrides])
    for text in space_overrides:  # the space's keys are dotted keys themselves
        parts, value = parse_override(text)
        space = raw.setdefault("sweep", {}).setdefault("space", {})
        key = ".".join(parts[2:])
        if value is None:
            space.pop(key, None)  # sweep.space.KEY=null drops a key from the space
        else:
            space[key] = value
    try:
        cfg = SweepConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, str(path))) from None

    base_raw: dict = {}
    if cfg.base:
        base_path = (p.parent / cfg.base).resolve()
        if not base_path.is_file():
            raise ConfigError(f"base: {cfg.base!r} not found (looked for {base_path})")
        base_raw = read_yaml_mapping(base_path)
    for key, value in cfg.overrides.items():
        base_raw = _set(base_raw, key, value)
    swept = set(cfg.sweep.space)
    for text in base_overrides:
        key = text.split("=", 1)[0].strip()
        if key in swept:
            raise ConfigError(f"{key}: is swept (sweep.space.{key}); override the space instead, e.g. "
                              f"'sweep.space.{key}={{choice: [...]}}', or drop it from the space")
    base_raw = apply_overrides(base_raw, base_overrides)
    source = f"{path} (base experiment)"
    base = validate_stage(base_raw, cfg.stage, source)

    known = set(flatten(base))
    for key, entry in cfg.sweep.space.items():
        if key not in known:
            raise ConfigError(f"sweep.space.{key}: not a key of the {cfg.stage} experiment")
        if key in ("name", "tracking.experiment", "tracking.registered_model"):
            raise ConfigError(f"sweep.space.{key}: cannot be swept (every trial of a sweep is tracked together)")
        if key == "train.epochs" or key.startswith("scaling."):
            raise ConfigError(f"sweep.space.{key}: cannot be swept (the scheduler's clock and the trial "
                              f"concurrency come from the base experiment); set it under overrides")
        for value in entry.edge_values():
            try:
                validate_stage(trial_raw(base_raw, {key: value}), cfg.stage, source)
            except ConfigError as exc:
                detail = str(exc).split("\n", 1)[-1].strip()
                raise ConfigError(f"sweep.space.{key}: value {value!r} is not valid: {detail}") from None
    if cfg.sweep.metric is None:
        from medfuse_core.objectives import OBJECTIVES

        cfg.sweep.metric = OBJECTIVES.get(base.objective.name).score_key
    return Sweep(config=cfg, base_raw=base_raw, base=base)
