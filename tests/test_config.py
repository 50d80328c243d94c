"""Config schema: YAML + overrides, errors that name the key, CLI exit code 2 with nothing written."""

from pathlib import Path

import pytest

from medfuse_core.config import ConfigError, FinetuneConfig, flatten
from medfuse_core.experiment import load_config
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["finetune_cxr_cpu.yaml", "finetune_cxr_gpu.yaml"])
def test_shipped_experiments_validate(name):
    cfg = load_config(REPO / "experiments" / name)
    assert isinstance(cfg, FinetuneConfig)


def test_overrides_are_typed_and_nested():
    cfg = load_config(REPO / "experiments" / "finetune_cxr_cpu.yaml",
                      ["train.epochs=3", "model.fusion.name=gated", "data.labels=[Cardiomegaly, Edema]"])
    assert cfg.train.epochs == 3 and cfg.model.fusion.name == "gated"
    assert cfg.data.labels == ["Cardiomegaly", "Edema"]
    flat = flatten(cfg)
    assert flat["train.epochs"] == 3 and flat["model.fusion.name"] == "gated"


@pytest.mark.parametrize("override, needle", [
    ("train.epoch=3", "train.epoch: unknown key"),
    ("train.epochs=three", "train.epochs"),
    ("train.epochs=0", "train.epochs"),
    ("fusion.dim=64", "fusion: unknown key"),
    ("model.fusion.heads=5", "divisible"),
    ("data.uncertain_policy=maybe", "data.uncertain_policy"),
    ("data.labels=[Cardiomegaly, Dragons]", "Dragons"),
    ("train.ema_decay=1.0", "train.ema_decay"),
    ("train.lr_schedule=linear", "train.lr_schedule"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "experiments" / "finetune_cxr_cpu.yaml", [override])
    assert needle in str(err.value)


@pytest.mark.parametrize("stage", ["finetune", "pretrain", "report"])
def test_weight_average_is_refused_under_zero3(stage):
    from medfuse_core.config import STAGE_SCHEMAS

    experiment = REPO / "experiments" / f"{stage}_cxr_cpu.yaml"
    with pytest.raises(ConfigError, match=r"train\.ema_decay: .*ZeRO-3"):
        load_config(experiment, ["train.ema_decay=0.9", "deepspeed.zero_stage=3"], STAGE_SCHEMAS[stage])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_config_error_exits_2_and_writes_nothing(tmp_path, capsys):
    workdir = tmp_path / "w"
    code = main(["finetune", "--config", str(REPO / "experiments" / "finetune_cxr_cpu.yaml"),
                 "--data", str(tmp_path / "data"), "--workdir", str(workdir), "train.lr=-1"])
    assert code == 2
    assert "train.lr" in capsys.readouterr().err
    assert not workdir.exists()


def test_cli_missing_data_exits_2(tmp_path, capsys):
    code = main(["finetune", "--config", str(REPO / "experiments" / "finetune_cxr_cpu.yaml"),
                 "--data", str(tmp_path / "nodata"), "--workdir", str(tmp_path / "w")])
    assert code == 2
    assert "ingest_summary.json" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()
