"""Sweep files: loading, the search space checked against the stage's schema, overrides, and
the Tune objects built from them (no cluster needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from medfuse_core.config import ConfigError
from medfuse_core.sweep_config import load_sweep, trial_raw, validate_stage
from pipelines import sweep as sweep_mod

REPO = Path(__file__).resolve().parents[1]
CPU_SWEEP = REPO / "experiments" / "sweep_fusion_cpu.yaml"


def test_shipped_sweeps_load_and_cover_the_fusion_modules():
    for name in ("sweep_fusion_cpu.yaml", "sweep_fusion_gpu.yaml", "compare_fusion_cpu.yaml"):
        plan = load_sweep(REPO / "experiments" / name)
        space = plan.config.sweep.space
        assert set(space["model.fusion.name"].args) == {"concat", "gated", "cross_attention", "co_attention"}
        assert plan.config.sweep.metric == "val/auroc_macro"
    cpu = load_sweep(CPU_SWEEP)
    assert cpu.config.sweep.num_samples >= 8 and cpu.config.sweep.scheduler.name == "asha"
    assert cpu.base.train.epochs == 4  # the sweep file's fixed override over the base experiment
    for key in ("train.lr", "model.fusion.dim", "model.text.trainable_layers", "data.uncertain_policy",
                "data.blank_policy"):
        assert key in cpu.config.sweep.space


def test_overrides_set_the_base_or_the_sweep_and_never_a_swept_key():
    plan = load_sweep(CPU_SWEEP, ["train.epochs=2", "sweep.num_samples=3", "sweep.scheduler.name=fifo",
                                  "sweep.space.train.lr={choice: [0.001, 0.002]}", "sweep.space.data.blank_policy=null"])
    assert plan.base.train.epochs == 2 and plan.config.sweep.num_samples == 3
    assert plan.config.sweep.scheduler.name == "fifo"
    assert plan.config.sweep.space["train.lr"].kind == "choice"
    assert "data.blank_policy" not in plan.config.sweep.space
    with pytest.raises(ConfigError, match=r"train\.lr: is swept"):
        load_sweep(CPU_SWEEP, ["train.lr=0.01"])


@pytest.mark.parametrize("override, message", [
    ("sweep.space.train.bogus={choice: [1]}", r"sweep\.space\.train\.bogus: not a key"),
    ("sweep.space.model.fusion.name={choice: [concat, nope]}", r"sweep\.space\.model\.fusion\.name: value 'nope'"),
    ("sweep.space.train.lr={loguniform: [-1, 0.1]}", r"loguniform: low"),
    ("sweep.space.train.lr={uniform: [0.1, 0.01]}", r"must be below high"),
    ("sweep.space.train.lr={uniform: [0.0, 0.01]}", r"sweep\.space\.train\.lr: value 0\.0 is not valid: train\.lr"),
    ("sweep.space.model.fusion.dim={randint: [7, 9]}", r"sweep\.space\.model\.fusion\.dim: value 7"),
    ("sweep.space.train.lr={choice: [0.1], uniform: [0.1, 0.2]}", r"exactly one of"),
    ("sweep.space.tracking.experiment={choice: [a, b]}", r"cannot be swept"),
    ("sweep.num_samples=0", r"sweep\.num_samples"),
    ("sweep.bogus=1", r"sweep\.bogus: unknown key"),
])
def test_bad_spaces_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(CPU_SWEEP, [override])


def test_missing_base_and_file_are_named(tmp_path):
    (tmp_path / "s.yaml").write_text("base: nowhere.yaml\nsweep: {space: {train.lr: {choice: [0.1]}}}\n")
    with pytest.raises(ConfigError, match="base: 'nowhere.yaml' not found"):
        load_sweep(tmp_path / "s.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_sweep(tmp_path / "missing.yaml")


def test_names_and_combinations_are_checked_before_anything_runs():
    with pytest.raises(ConfigError, match=r"sweep\.scheduler\.name: unknown trial scheduler 'hyperband'"):
        sweep_mod.check_sweep(load_sweep(CPU_SWEEP, ["sweep.scheduler.name=hyperband"]))
    with pytest.raises(ConfigError, match=r"sweep\.searcher\.name: unknown search algorithm"):
        sweep_mod.check_sweep(load_sweep(CPU_SWEEP, ["sweep.searcher.name=grid"]))
    compare = REPO / "experiments" / "compare_fusion_cpu.yaml"
    with pytest.raises(ConfigError, match="grid entries need searcher random"):
        sweep_mod.check_sweep(load_sweep(compare, ["sweep.searcher.name=optuna"]))
    sweep_mod.check_sweep(load_sweep(compare))


def test_trial_config_is_the_base_with_the_drawn_values():
    plan = load_sweep(CPU_SWEEP)
    cfg = validate_stage(trial_raw(plan.base_raw, {"model.fusion.name": "concat", "train.lr": 0.002}),
                         "finetune", "trial")
    assert cfg.model.fusion.name == "concat" and cfg.train.lr == 0.002
    assert cfg.train.epochs == plan.base.train.epochs and cfg.model.text.frozen_cache_rows == 2048
    assert plan.base_raw["model"]["fusion"]["name"] == "gated"  # the base is not changed


def test_tune_space_scheduler_and_concurrency():
    from ray import tune

    plan = load_sweep(CPU_SWEEP)
    space = sweep_mod.param_space(plan)
    assert isinstance(space["train.lr"], tune.search.sample.Float)
    assert sorted(space["model.fusion.name"].categories) == ["co_attention", "concat", "cross_attention", "gated"]
    asha = sweep_mod.SCHEDULERS.get("asha")(plan, sweep_mod.tune_metric(plan))
    assert asha._time_attr == "epochs_done" and asha._max_t == plan.base.train.epochs
    # 2 workers x 0.5 CPU + 1 CPU for the trial's reads: one trial on 2 CPUs, four on 8
    assert sweep_mod.concurrency(plan, {"CPU": 2.0}) == 1
    assert sweep_mod.concurrency(plan, {"CPU": 8.0}) == 4
    gpu = load_sweep(REPO / "experiments" / "sweep_fusion_gpu.yaml")
    assert sweep_mod.concurrency(gpu, {"CPU": 128.0, "GPU": 16.0}) == 2  # 8 GPUs a trial
    assert sweep_mod.concurrency(load_sweep(CPU_SWEEP, ["sweep.max_concurrent_trials=3"]), {"CPU": 2.0}) == 3
    # the limit reaches the search algorithm itself (Tune ignores max_concurrent_trials for a generator)
    assert sweep_mod.SEARCHERS.get("random")(plan, "val_auroc_macro", 1).max_concurrent == 1
    assert sweep_mod.SEARCHERS.get("optuna")(plan, "val_auroc_macro", 2).max_concurrent == 2


def _rows():
    rows = []
    for i, (fusion, lr, status, curve) in enumerate([
            ("gated", 1e-3, "completed", [(1, 0.6), (2, 0.7)]), ("concat", 3e-4, "stopped", [(1, 0.5)]),
            ("co_attention", 2e-3, "completed", [(1, 0.55), (2, 0.72)]), ("concat", 5e-4, "errored", [])]):
        values = [v for _, v in curve]
        rows.append({"trial_id": f"t{i}", "status": status, "params": {"model.fusion.name": fusion, "train.lr": lr},
                     "epochs_done": curve[-1][0] if curve else 0, "curve": curve,
                     "metric_best": max(values) if values else float("nan"),
                     "metric_last": values[-1] if values else float("nan"), "mlflow_run_id": None, "model_uri": None})
    return rows


def test_sweep_figures_and_results_table_from_rows():
    from pipelines import sweep_plots
    from pipelines.sweep_tracking import results_frame

    plan = load_sweep(CPU_SWEEP, ["sweep.space.model.fusion.dim=null", "sweep.space.model.text.trainable_layers=null",
                                  "sweep.space.data.uncertain_policy=null", "sweep.space.data.blank_policy=null"])
    figs = sweep_plots.figures(_rows(), plan, "val/auroc_macro")
    assert set(figs) == {"metric_vs_params", "learning_curves", "parallel_coordinates"}
    assert len(figs["learning_curves"].axes[0].lines) == 3  # the errored trial reported nothing
    assert len(figs["parallel_coordinates"].axes[0].lines) >= 3
    for fig in figs.values():
        sweep_plots.close(fig)
    frame = results_frame(_rows(), "val/auroc_macro")
    assert list(frame["status"]) == ["completed", "stopped", "completed", "errored"]
    assert frame["val/auroc_macro_best"].iloc[2] == 0.72 and "train.lr" in frame


def test_asha_stops_at_a_rung_but_never_a_trial_that_trained_every_epoch():
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler

    plan = load_sweep(CPU_SWEEP)  # 4 epochs, grace 1, factor 2: Ray's rungs at 1, 2 and 4
    asha = sweep_mod.SCHEDULERS.get("asha")(plan, "val_auroc_macro")
    asha.set_search_properties("val_auroc_macro", "max")
    good, bad = SimpleNamespace(trial_id="good"), SimpleNamespace(trial_id="bad")
    for trial in (good, bad):
        asha.on_trial_add(None, trial)
    for epoch in (1, 2, 4):
        assert asha.on_trial_result(None, good, {"epochs_done": epoch, "val_auroc_macro": 0.9}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, bad, {"epochs_done": 1, "val_auroc_macro": 0.5}) == TrialScheduler.STOP
    # at the last rung a worse trial is past stopping: it goes on to log its model
    late = SimpleNamespace(trial_id="late")
    asha.on_trial_add(None, late)
    assert asha.on_trial_result(None, late, {"epochs_done": 4, "val_auroc_macro": 0.1}) == TrialScheduler.CONTINUE


def test_sweep_metric_mode_and_space_checks():
    with pytest.raises(ConfigError, match=r"sweep\.metric: 'val/loss' is not reported"):
        sweep_mod.check_sweep(load_sweep(CPU_SWEEP, ["sweep.metric=val/loss"]))
    with pytest.raises(ConfigError, match=r"sweep\.mode: train/loss_epoch is a loss"):
        sweep_mod.check_sweep(load_sweep(CPU_SWEEP, ["sweep.metric=train/loss_epoch"]))
    sweep_mod.check_sweep(load_sweep(CPU_SWEEP, ["sweep.metric=val/auroc/Edema"]))
    with pytest.raises(ConfigError, match=r"sweep\.space\.model\.fusion\.dim: value 75\.84 is not valid: model\.fusion\.dim: Input should be a valid integer"):
        load_sweep(CPU_SWEEP, ["sweep.space.model.fusion.dim={uniform: [64, 96]}"])  # an int key
    with pytest.raises(ConfigError, match=r"sweep\.space\.train\.epochs: cannot be swept"):
        load_sweep(CPU_SWEEP, ["sweep.space.train.epochs={choice: [2, 4]}"])
    with pytest.raises(ConfigError, match=r"sweep\.space\.scaling\.num_workers: cannot be swept"):
        load_sweep(CPU_SWEEP, ["sweep.space.scaling.num_workers={choice: [1, 2]}"])
    with pytest.raises(ConfigError, match=r"sweep\.space\.data\.labels: optuna draws scalar choices only"):
        sweep_mod.check_sweep(load_sweep(CPU_SWEEP, ["sweep.searcher.name=optuna",
                                                     "sweep.space.data.labels={choice: [[Edema], [Atelectasis]]}"]))


def test_a_key_new_to_the_schema_at_its_default_does_not_block_a_resume():
    from medfuse_core.config import PretrainConfig
    from pipelines.training import config_changes

    cfg = PretrainConfig()
    older = cfg.model_dump()
    del older["objective"]["mask_duplicate_texts"]  # written before the key existed
    assert config_changes(older, cfg) == []
    changed = PretrainConfig.model_validate({"objective": {"name": "infonce", "mask_duplicate_texts": False}})
    assert config_changes(older, changed) == ["objective.mask_duplicate_texts"]
