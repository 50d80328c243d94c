"""Calibration of a trained diagnosis model on the validation split (run by ``medfuse finetune``
before the model is logged): per finding and scoring mode, a temperature (Guo et al., 2017) and
the F1-best operating point on the calibrated probabilities, stored in the bundle's ``extra``
(``calibration``, ``thresholds``) so every consumer (evaluate, predict, the served model)
applies the same ones. ECE before and after and reliability diagrams go to MLflow."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("medfuse")


def calibrate_model(model_dir: Path, data_dir: Path) -> tuple[dict, dict]:
    """Fit and store the calibration; returns ``(metrics, figures)`` for the training run."""
    from medfuse_core.evaluation.calibration import fit_calibration, macro
    from medfuse_core.models.bundle import read_bundle_meta, update_bundle_extra
    from pipelines import plots
    from pipelines.evaluate import MODES, score_splits

    meta = read_bundle_meta(model_dir)
    names = meta["label_names"]
    blank_policy = (meta.get("extra") or {}).get("blank_policy", "negative")
    update_bundle_extra(model_dir, {"calibration": None, "thresholds": None})  # fitted on raw scores only
    part = score_splits(model_dir, data_dir, blank_policy, splits=("validate",))["validate"]
    if len(part["y"]) == 0:
        log.warning("calibration: no labelled validate rows; probabilities stay uncalibrated, thresholds 0.5")
        return {}, {}
    cal = fit_calibration({m: part[f"{m}_raw"] for m in MODES}, part["y"], names)
    update_bundle_extra(model_dir, {
        "calibration": {"method": "temperature", "fitted_on": "validate", "n": cal["n"],
                        "temperatures": cal["temperatures"]},
        "thresholds": cal["thresholds"]})
    metrics, figures = {}, {}
    for mode in MODES:
        metrics[f"val/{mode}/ece_macro_before"] = macro(cal["ece_before"][mode])
        metrics[f"val/{mode}/ece_macro_after"] = macro(cal["ece_after"][mode])
        from medfuse_core.evaluation.calibration import calibrate_probabilities

        figures[f"calibration/reliability_validate_{mode}.png"] = plots.reliability_before_after(
            part[f"{mode}_raw"], calibrate_probabilities(part[f"{mode}_raw"], cal["temperatures"][mode]),
            part["y"], names, mode)
    log.info("calibration on %d validate images: ECE (macro) image+text %.3f -> %.3f", cal["n"],
             metrics["val/image_text/ece_macro_before"], metrics["val/image_text/ece_macro_after"])
    return {k: v for k, v in metrics.items() if v == v}, figures
