"""Stage 1 end to end on a real local Ray cluster: contrastive pretraining (2 workers, DeepSpeed
ZeRO-2, gathered negatives), evaluation by zero-shot and retrieval, resume, the hand-off to
fine-tuning through MLflow, and label fractions."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from medfuse_core.config import ConfigError, FinetuneConfig, PretrainConfig
from medfuse_core.experiment import load_config
from pipelines import finetune, pretrain
from pipelines.cli import main

from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_CPU = REPO / "experiments" / "pretrain_cxr_cpu.yaml"
PRETRAIN_TINY = ["data.image_size=48", "model.text.max_tokens=24", "model.text.trainable_layers=1",
                 "model.embed_dim=32", "train.batch_size=8", "train.epochs=1", "train.warmup_steps=1",
                 "train.log_every_steps=2"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pretrained(tiny_data, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain") / "w"
    cfg = load_config(PRETRAIN_CPU, PRETRAIN_TINY, schema=PretrainConfig)
    facts = pretrain.run(cfg, tiny_data, workdir)
    return workdir, facts


def test_shipped_pretrain_experiments_validate():
    for name in ("pretrain_cxr_cpu.yaml", "pretrain_cxr_gpu.yaml"):
        cfg = load_config(REPO / "experiments" / name, schema=PretrainConfig)
        assert cfg.objective.name == "infonce"
    assert load_config(PRETRAIN_CPU, ["objective.name=siglip"], schema=PretrainConfig).objective.name == "siglip"
    with pytest.raises(ConfigError, match="objective.name"):
        load_config(PRETRAIN_CPU, ["objective.name=bce"], schema=PretrainConfig)
    with pytest.raises(ConfigError, match="text.name_or_path"):
        load_config(PRETRAIN_CPU, ["model.text.name_or_path=none"], schema=PretrainConfig)


def test_pretrain_tracks_retrieval_and_zero_shot(pretrained):
    workdir, facts = pretrained
    meta = json.loads((workdir / "model" / "medfuse_model.json").read_text())
    assert meta["kind"] == "contrastive" and meta["label_names"] == []
    assert meta["extra"]["objective"] == "infonce" and meta["extra"]["stage"] == "pretrain"
    client = mlflow.MlflowClient(facts["tracking_uri"])
    run = client.get_run(facts["mlflow_run_id"])
    assert run.data.tags["medfuse.stage"] == "pretrain" and run.data.tags["medfuse.objective"] == "infonce"
    for key in ("val/retrieval_mean_recall", "val/retrieval/image_to_text/R_at_1", "val/zero_shot_auroc_macro",
                "val/logit_scale", "train/loss"):
        assert key in run.data.metrics, key
    assert 0.0 <= run.data.metrics["val/retrieval_mean_recall"] <= 1.0
    version = client.get_model_version_by_alias("medfuse-cxr-pretrain", "candidate")
    assert version.run_id == facts["mlflow_run_id"]


def test_evaluate_on_a_pretrained_model(pretrained, tiny_data, tmp_path):
    workdir, facts = pretrained
    out = tmp_path / "zs.json"
    assert main(["evaluate", "--model", str(workdir), "--data", str(tiny_data), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "contrastive" and result["n_test"] >= 2
    assert result["zero_shot"]["auroc"] and 0.0 <= result["zero_shot"]["auroc_macro"] <= 1.0
    for direction in ("image_to_text", "text_to_image"):
        r = result["retrieval"][direction]
        assert set(r) == {"R@1", "R@5", "R@10"}
        assert 0.0 <= r["R@1"] <= r["R@5"] <= r["R@10"] <= 1.0
    run = mlflow.MlflowClient(facts["tracking_uri"]).get_run(facts["mlflow_run_id"])
    assert "test/zero_shot/auroc_macro" in run.data.metrics
    assert "test/retrieval/image_to_text/R_at_10" in run.data.metrics


def test_per_image_zero_shot_scores_give_the_reported_auroc(pretrained, tiny_data):
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.zero_shot import default_prompts_path, zero_shot_metrics
    from medfuse_core.models.bundle import load_bundle
    from pipelines import evaluate_pretrained
    from pipelines.runtime import init_ray

    init_ray()
    workdir, _ = pretrained
    parts = evaluate_pretrained.embed_split(workdir / "model", tiny_data, "test")
    names = list(CHEXPERT_LABELS)
    r = evaluate_pretrained.score(parts, load_bundle(workdir / "model"), default_prompts_path(), names,
                                  per_image=True)
    scores, y = r["per_image"]["scores"], r["per_image"]["y"]
    assert y.shape == (len(parts["image"]), len(names))
    assert all(len(v) == len(y) for v in scores.values())
    assert r["zero_shot"]["auroc"] and zero_shot_metrics(scores, y, names)["auroc"] == r["zero_shot"]["auroc"]
    assert "per_image" not in evaluate_pretrained.score(parts, load_bundle(workdir / "model"),
                                                        default_prompts_path(), names)


def test_encoder_weights_reach_the_diagnosis_model(pretrained):
    from safetensors.torch import load_file

    from medfuse_core.models import build_model
    from medfuse_core.models.bundle import load_encoder_weights

    workdir, _ = pretrained
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["model.text.trainable_layers=1"])
    model = build_model(cfg.model, num_labels=len(cfg.data.labels), image_size=cfg.data.image_size)
    source = load_file(str(workdir / "model" / "model.safetensors"))
    before = model.state_dict()["vision_encoder.backbone.conv1.weight"].clone()
    n = load_encoder_weights(model, str(workdir / "model"))
    after = model.state_dict()
    assert n == sum(k.startswith(("vision_encoder.", "text_encoder.")) for k in source)
    assert not torch.equal(before, after["vision_encoder.backbone.conv1.weight"])
    for key in ("vision_encoder.backbone.conv1.weight", "vision_encoder.backbone.layer4.1.bn2.running_mean"):
        assert torch.equal(after[key], source[key])
    text_key = next(k for k in source if k.startswith("text_encoder.") and k.endswith("weight"))
    assert torch.equal(after[text_key], source[text_key])


def test_finetune_from_pretrained_records_lineage(pretrained, tiny_data, tmp_path):
    workdir, pre = pretrained
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["train.epochs=1", f"init_from={workdir}"])
    facts = finetune.run(cfg, tiny_data, tmp_path / "ft")
    lineage = facts["lineage"]
    assert lineage["init_from_run_id"] == pre["mlflow_run_id"]
    assert lineage["init_from_data_digest"] == pre["data_digest"]
    run = mlflow.MlflowClient(facts["tracking_uri"]).get_run(facts["mlflow_run_id"])
    assert run.data.tags["medfuse.init_from_run_id"] == pre["mlflow_run_id"]
    assert run.data.tags["medfuse.init_from_data_digest"] == pre["data_digest"]
    assert run.data.params["init_from"] == str(workdir)
    assert (tmp_path / "ft" / "init_from" / "model.safetensors").is_file()  # a resume finds the same weights


def test_init_from_another_encoder_is_refused_before_training(pretrained, tiny_data, tmp_path, capsys):
    workdir, _ = pretrained
    code = main(["finetune", "--config", str(CPU_EXPERIMENT), "--data", str(tiny_data),
                 "--workdir", str(tmp_path / "ft"), *TINY_OVERRIDES, "model.vision.name=resnet34",
                 f"init_from={workdir}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.vision.name" in err and "resnet18" in err
    assert not (tmp_path / "ft" / "ray").exists()


def test_pretrain_resumes_its_run(pretrained, tiny_data):
    workdir, first = pretrained
    cfg = load_config(PRETRAIN_CPU, PRETRAIN_TINY + ["train.epochs=2"], schema=PretrainConfig)
    facts = pretrain.run(cfg, tiny_data, workdir)
    assert facts["mlflow_run_id"] == first["mlflow_run_id"]
    client = mlflow.MlflowClient(facts["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(facts["mlflow_run_id"], "val/retrieval_mean_recall")]
    assert len(steps) == 2 and len(set(steps)) == 2  # one value per epoch, none repeated
    assert client.get_run(facts["mlflow_run_id"]).data.tags.get("medfuse.resumed_from_step")


def test_label_fraction_is_patient_level_and_nested(tiny_data):
    import pyarrow.dataset as pads

    from pipelines.shards import count_fraction, patient_share, split_dir

    table = pads.dataset(str(split_dir(tiny_data, "train")), format="parquet", partitioning=None).to_table(
        columns=["patient_id", "labelled"])
    ids = table.column("patient_id").to_pylist()
    share = patient_share(ids, seed=0)
    for pid in set(ids):  # every image of a patient is on one side of any cut
        assert len({float(s) for p, s in zip(ids, share) if p == pid}) == 1
    counts = [count_fraction(tiny_data, "train", f, seed=0)["images"] for f in (0.1, 0.5, 1.0)]
    assert counts[0] <= counts[1] <= counts[2] == sum(table.column("labelled").to_pylist())
    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + ["data.label_fraction=0.01"])
    from medfuse_core.data.sources import SourceError
    from pipelines.ingest import load_summary

    with pytest.raises(SourceError, match="label_fraction"):
        finetune.check_data(cfg, load_summary(tiny_data), tiny_data)
    assert isinstance(cfg, FinetuneConfig)


def test_siglip_objective_trains_a_step_in_one_process():
    from medfuse_core.objectives import build_objective

    cfg = load_config(PRETRAIN_CPU, PRETRAIN_TINY + ["objective.name=siglip", "model.text.trainable_layers=0"],
                      schema=PretrainConfig)
    objective = build_objective(cfg)
    model = objective.build_model()
    tokenizer = objective.tokenizer()
    rng = np.random.default_rng(0)
    rows = {"image": [rng.random((48, 48)).astype(np.float16).tobytes() for _ in range(4)],
            "image_size": np.full(4, 48), "labels": [np.full(14, np.nan, np.float32)] * 4,
            "labelled": np.zeros(4, bool),
            "report": [f"FINDINGS: finding {i}.\n\nIMPRESSION: impression {i}." for i in range(4)]}
    batch = objective.make_batch(rows, tokenizer, train=True, generator=torch.Generator().manual_seed(0))
    loss = objective.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss) and model.logit_scale.bias.grad is not None


def test_findings_positives_and_text_mixer_train_a_step_in_one_process():
    from medfuse_core.objectives import build_objective

    cfg = load_config(PRETRAIN_CPU, PRETRAIN_TINY + ["objective.positives=findings", "model.text_mixer_layers=1",
                                                     "model.text.trainable_layers=0"], schema=PretrainConfig)
    objective = build_objective(cfg)
    model = objective.build_model()
    model.eval()  # no dropout: the padding check below compares exact embeddings
    tokenizer = objective.tokenizer()
    rng = np.random.default_rng(0)
    reports = ["FINDINGS: Small left pleural effusion.", "FINDINGS: Moderate right effusion.",
               "FINDINGS: Lungs are clear.", "IMPRESSION: No acute cardiopulmonary process."]
    rows = {"image": [rng.random((48, 48)).astype(np.float16).tobytes() for _ in range(4)],
            "image_size": np.full(4, 48), "report": reports}
    batch = objective.make_batch(rows, tokenizer, train=True, generator=torch.Generator().manual_seed(0))
    g = batch["group_ids"].tolist()
    assert g[0] == g[1] != g[2] == g[3]
    loss = objective.loss(model, batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.text_mixer.layers[0].linear1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())  # the encoder stays frozen
    # padding never changes a text's embedding: the mixer masks padded tokens
    ids, mask = batch["input_ids"][:1], batch["attention_mask"][:1]
    n = int(mask.sum())
    with torch.no_grad():
        short = model.encode_texts(ids[:, :n], mask[:, :n])
        padded = model.encode_texts(torch.cat([ids[:, :n], torch.zeros(1, 5, dtype=ids.dtype)], 1),
                                    torch.cat([mask[:, :n], torch.zeros(1, 5, dtype=mask.dtype)], 1))
    torch.testing.assert_close(short, padded, rtol=1e-4, atol=1e-5)
