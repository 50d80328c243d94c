"""``medfuse promote``: move a registered model's ``champion`` alias to its ``candidate`` when
the candidate's validation metric (logged on its training run) is at least the champion's
plus ``min_gain``. Every decision is recorded as tags on the candidate's model version."""

from __future__ import annotations

import time

from medfuse_core.data.sources import SourceError

DEFAULT_METRIC = "best/auroc_macro"  # the diagnosis checkpoint score on validation (report: best/token_accuracy)


def promote(name: str, metric: str = DEFAULT_METRIC, min_gain: float = 0.0, tracking_uri: str | None = None) -> dict:
    """Compare ``name@candidate`` with ``name@champion`` on ``metric``; move the alias if it wins."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        candidate = client.get_model_version_by_alias(name, "candidate")
    except MlflowException:
        raise SourceError(f"--name: {name} has no version with the alias 'candidate'; train one first "
                          "(`medfuse finetune ...` registers it)") from None
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None

    def value(version) -> float:
        metrics = client.get_run(version.run_id).data.metrics
        if metric not in metrics:
            raise SourceError(f"--metric: run {version.run_id} of {name} v{version.version} has no metric {metric!r}")
        return float(metrics[metric])

    cand = value(candidate)
    champ = value(champion) if champion is not None else None
    same = champion is not None and champion.version == candidate.version
    promoted = not same and (champ is None or cand >= champ + min_gain)
    decision = {"name": name, "metric": metric, "candidate_version": candidate.version, "candidate": cand,
                "champion_version": None if champion is None else champion.version, "champion": champ,
                "min_gain": min_gain, "promoted": promoted,
                "reason": ("already the champion" if same else "no champion yet" if champ is None
                           else f"{cand:.4f} {'>=' if promoted else '<'} {champ:.4f} + {min_gain}")}
    if promoted:
        client.set_registered_model_alias(name, "champion", candidate.version)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    client.set_model_version_tag(name, candidate.version, "medfuse.promotion",
                                 f"{'promoted' if promoted else 'refused'} {stamp}: {decision['reason']}")
    return decision
