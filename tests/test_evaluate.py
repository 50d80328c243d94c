"""evaluate: reads only the validate and test splits, scores in an actor pool exactly like
``score_rows``, honours the bundle's blank-label policy, logs patient images only on request."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from medfuse_core.data.labels import CHEXPERT_LABELS
from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

SIZE = 48
CONTEXTS = ["shortness of breath", "", "fever and cough", "  ", "chest pain, rule out effusion", None]


def _rows(split: str, n: int, rng: np.random.Generator, n_unlabelled: int = 0) -> pa.Table:
    values = np.array([1.0, 0.0, -1.0, np.nan], dtype=np.float32)
    images, labels, labelled = [], [], []
    for i in range(n + n_unlabelled):
        img = np.clip(rng.normal(0.5, 0.15, (SIZE, SIZE)), 0, 1).astype(np.float16)
        images.append(img.tobytes())
        if i < n:
            labels.append(rng.choice(values, size=len(CHEXPERT_LABELS), p=[0.35, 0.35, 0.1, 0.2]).tolist())
            labelled.append(True)
        else:
            labels.append([float("nan")] * len(CHEXPERT_LABELS))
            labelled.append(False)
    return pa.table({
        "image": pa.array(images, pa.binary()),
        "image_size": pa.array([SIZE] * len(images), pa.int32()),
        "context": pa.array([CONTEXTS[i % len(CONTEXTS)] for i in range(len(images))], pa.string()),
        "labels": pa.array(labels, pa.list_(pa.float32())),
        "labelled": pa.array(labelled, pa.bool_()),
        "record_id": pa.array([f"{split}-{i}" for i in range(len(images))], pa.string()),
    })


def make_data(root: Path, splits=("train", "validate", "test"), seed: int = 0) -> Path:
    """A tiny ingest output in the hive layout (two files per split, small row groups)."""
    rng = np.random.default_rng(seed)
    for split in splits:
        d = root / "shards" / f"split={split}"
        d.mkdir(parents=True)
        for part in range(2):
            pq.write_table(_rows(split, 20, rng, n_unlabelled=3), d / f"part-{part}.parquet", row_group_size=4)
    (root / "ingest_summary.json").write_text(json.dumps(
        {"format": "test", "dataset_name": "medfuse-test-shards", "digest": f"{seed + 12345:064x}"}))
    return root


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory) -> Path:
    """A real bundle from the tiny CPU config; trained with blank labels ignored."""
    import torch

    from medfuse_core.experiment import load_config
    from medfuse_core.models import build_model, save_bundle

    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["model.fusion.name=co_attention"])  # it has attention maps
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CHEXPERT_LABELS), cfg.data.image_size, load_vision_weights=False).eval()
    out = tmp_path_factory.mktemp("bundle") / "model"
    return save_bundle(model, cfg.model, list(CHEXPERT_LABELS), cfg.data.image_size, out,
                       extra={"blank_policy": "ignore"})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = make_data(tmp_path_factory.mktemp("eval") / "data")
    # evaluate must never list or open the train split
    (root / "shards" / "split=train" / "corrupt.parquet").write_bytes(b"this is not parquet")
    return root


def _direct(bundle_dir: Path, data_dir: Path, split: str) -> dict:
    """Score a split's labelled rows in-process with score_rows, no Ray."""
    from medfuse_core.data.batching import label_indices
    from medfuse_core.evaluation.inference import score_rows
    from medfuse_core.data.labels import evaluation_targets
    from medfuse_core.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    table = pq.read_table(data_dir / "shards" / f"split={split}", partitioning=None,
                          filters=[("labelled", "=", True)])
    rows = table.to_pydict()
    scores = score_rows(bundle, rows)
    raw = np.asarray(rows["labels"], dtype=np.float32)[:, label_indices(bundle.label_names)]
    return {"y": evaluation_targets(raw, blank_policy="ignore"), **scores}


def test_scorer_resources_fill_the_cluster_but_leave_cpus_to_read():
    from pipelines.evaluate import scorer_resources

    assert scorer_resources({"CPU": 2.0}) == {"min_size": 1, "max_size": 1, "num_cpus": 1, "num_gpus": 0, "threads": 1}
    big = scorer_resources({"CPU": 64.0})
    assert big["num_cpus"] == big["threads"] == 4 and big["max_size"] * 4 < 64 and big["max_size"] >= 12
    gpu = scorer_resources({"CPU": 32.0, "GPU": 4.0})
    assert gpu["num_gpus"] == 1 and gpu["max_size"] == 4 and gpu["num_cpus"] * 4 < 32


def test_evaluate_reads_validate_and_test_only_and_matches_score_rows(ray_local, bundle_dir, data_dir, tmp_path):
    from medfuse_core.evaluation.metrics import choose_thresholds, multilabel_metrics
    from pipelines import evaluate

    out = tmp_path / "metrics.json"
    result = evaluate.run(str(bundle_dir), data_dir, out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["n_test"] == 40 and result["n_validate"] == 40  # labelled rows only
    assert result["blank_policy"] == "ignore" and result["thresholds_from"] == "validate"
    assert result["data_digest"] == f"{12345:064x}"

    val, test = _direct(bundle_dir, data_dir, "validate"), _direct(bundle_dir, data_dir, "test")
    names = list(CHEXPERT_LABELS)
    for mode in evaluate.MODES:
        expected = multilabel_metrics(test[mode], test["y"], names, choose_thresholds(val[mode], val["y"]))
        got = result[mode]
        assert set(got["auroc"]) == set(expected["auroc"]) and got["auroc"], mode
        for key in ("auroc", "auprc", "f1"):
            for name, value in expected[key].items():
                assert got[key][name] == pytest.approx(value, abs=1e-6), (mode, key, name)
        for key in ("auroc_macro", "auprc_macro", "f1_macro"):
            assert got[key] == pytest.approx(expected[key], abs=1e-6)


def test_no_validate_split_warns_and_uses_default_thresholds(ray_local, bundle_dir, tmp_path, caplog):
    from pipelines import evaluate

    data = make_data(tmp_path / "data", splits=("train", "test"), seed=1)
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        result = evaluate.run(str(bundle_dir), data, tmp_path / "m.json")
    assert result["thresholds_from"] == "default_0.5" and result["n_validate"] == 0
    assert any("0.5" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_attention_rows_reads_at_most_n_rows_with_context(data_dir):
    from pipelines.evaluate import attention_rows

    for n in (1, 3, 6):
        table = attention_rows(data_dir, n)
        assert table.num_rows == n
        assert table.column_names == ["image", "image_size", "context"]
        assert all(c and c.strip() for c in table.column("context").to_pylist())


@pytest.mark.parametrize("fusion, has_map", [("co_attention", True), ("gated", False)])
def test_attention_figure_only_for_attention_fusions_and_says_why(fusion, has_map, data_dir, tmp_path, caplog):
    import torch

    from medfuse_core.experiment import load_config
    from medfuse_core.models import build_model, save_bundle
    from pipelines.evaluate import attention_figure

    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + [f"model.fusion.name={fusion}"])
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CHEXPERT_LABELS), cfg.data.image_size, load_vision_weights=False).eval()
    bundle = save_bundle(model, cfg.model, list(CHEXPERT_LABELS), cfg.data.image_size, tmp_path / "model")
    with caplog.at_level(logging.WARNING, logger="medfuse"):
        figure = attention_figure(bundle, data_dir)
    assert (figure is not None) == has_map
    if figure is not None:
        import matplotlib.pyplot as plt

        plt.close(figure)
    warned = [r.getMessage() for r in caplog.records if "no attention maps logged" in r.getMessage()]
    assert (warned == []) == has_map
    if not has_map:
        assert fusion in warned[0]


def test_images_reach_mlflow_only_with_log_images(ray_local, bundle_dir, data_dir, tmp_path):
    import mlflow

    from pipelines import tracking
    from pipelines.cli import main

    store = tmp_path / "mlruns"
    tracking.setup(store, "medfuse-eval-test")
    uri = mlflow.get_tracking_uri()
    assert uri.startswith("sqlite:")
    with mlflow.start_run() as run:
        run_id = run.info.run_id
    # a finetune workdir: the bundle plus the facts naming its run and store
    workdir = tmp_path / "train"
    workdir.mkdir()
    (workdir / "model").symlink_to(bundle_dir, target_is_directory=True)
    (workdir / "finetune.json").write_text(json.dumps({"mlflow_run_id": run_id, "tracking_uri": uri}))

    client = mlflow.MlflowClient(tracking_uri=uri)

    def artifacts() -> set[str]:
        return {a.path for a in client.list_artifacts(run_id, "evaluation")}

    assert main(["evaluate", "--model", str(workdir), "--data", str(data_dir), "--out", str(tmp_path / "a.json")]) == 0
    assert {"evaluation/metrics.json", "evaluation/roc_curves.png"} <= artifacts()
    assert not {"evaluation/attention_maps.png", "evaluation/grad_cam.png"} & artifacts()
    assert {"evaluation/reliability_image_only.png", "evaluation/reliability_image_text.png"} <= artifacts()
    result = json.loads((tmp_path / "a.json").read_text())
    assert result["calibration"]["fitted"] is False  # this bundle carries no temperatures: before = after
    cal = result["calibration"]["image_text"]
    assert cal["ece_macro_before"] == cal["ece_macro_after"]
    inputs = client.get_run(run_id).inputs.dataset_inputs
    evaluation = [i for i in inputs if {t.key: t.value for t in i.tags}.get("mlflow.data.context") == "evaluation"]
    assert len(evaluation) == 1 and evaluation[0].dataset.digest == f"{12345:064x}"[:36]

    assert main(["evaluate", "--model", str(workdir), "--data", str(data_dir), "--out", str(tmp_path / "b.json"),
                 "--log-images"]) == 0
    assert {"evaluation/attention_maps.png", "evaluation/grad_cam.png"} <= artifacts()


def test_device_wrapper_scores_like_the_bare_model(bundle_dir, data_dir):
    """The accelerator path hands score_rows' CPU tensors to the model and returns CPU outputs
    (run here on the CPU; on a GPU actor the device is "cuda")."""
    import dataclasses

    from medfuse_core.evaluation.inference import score_rows
    from medfuse_core.models.bundle import load_bundle
    from pipelines.evaluate import _OnDevice

    bundle = load_bundle(bundle_dir)
    rows = pq.read_table(data_dir / "shards" / "split=test", partitioning=None).slice(0, 5).to_pydict()
    wrapped = dataclasses.replace(bundle, model=_OnDevice(bundle.model, "cpu"))
    expected, got = score_rows(bundle, rows), score_rows(wrapped, rows)
    for mode in ("image_only", "image_text"):
        np.testing.assert_allclose(got[mode], expected[mode], rtol=0, atol=1e-6)
