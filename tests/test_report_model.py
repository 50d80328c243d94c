"""The report generator: connectors, teacher forcing on report tokens only, generation and stopping."""

from __future__ import annotations

import pytest
import torch

from medfuse_core.config import VisionConfig
from medfuse_core.models.report import CONNECTORS, DecodingConfig, ReportGenerator
from medfuse_core.models.text import load_tokenizer
from medfuse_core.models.tiny_lm import save_tiny_causal_lm
from medfuse_core.models.vision import build_vision_encoder

REPORTS = ["FINDINGS: small left effusion. IMPRESSION: effusion.", "FINDINGS: lungs clear. IMPRESSION: normal."]


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    return str(save_tiny_causal_lm(tmp_path_factory.mktemp("lm") / "llama", "llama", hidden=64, layers=2, heads=2))


def _model(lm_dir, connector):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    vision = build_vision_encoder(VisionConfig(name="resnet18"), 48, load_weights=False)
    return ReportGenerator(vision, AutoModelForCausalLM.from_pretrained(lm_dir), connector, num_queries=4)


@pytest.mark.parametrize("connector", CONNECTORS.names())
def test_training_steps_lower_the_report_loss(lm_dir, connector):
    model = _model(lm_dir, connector)
    tokenizer = load_tokenizer(lm_dir)
    enc = tokenizer(REPORTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    images = torch.randn(2, 1, 48, 48)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(15):
        out = model(images, enc["input_ids"], enc["attention_mask"])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_padding_and_prefix_are_not_scored(lm_dir):
    model = _model(lm_dir, "prefix").eval()
    tokenizer = load_tokenizer(lm_dir)
    enc = tokenizer(REPORTS[:1], padding="max_length", max_length=24, return_tensors="pt")
    images = torch.randn(1, 1, 48, 48)
    base = model(images, enc["input_ids"], enc["attention_mask"])["loss"]
    ids = enc["input_ids"].clone()
    ids[~enc["attention_mask"].bool()] = 5  # other token ids at padded positions change nothing
    assert torch.allclose(model(images, ids, enc["attention_mask"])["loss"], base)


def test_generation_shapes_and_stopping(lm_dir):
    model = _model(lm_dir, "cross_attention").eval()
    tokenizer = load_tokenizer(lm_dir)
    texts = model.generate(torch.randn(3, 1, 48, 48), tokenizer, DecodingConfig(max_new_tokens=6))
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(len(i) <= 6 * 3 for i in ids)  # at most 6 new tokens each (word pieces decode to <= 3 ids/word)
    beams = model.generate(torch.randn(1, 1, 48, 48), tokenizer, DecodingConfig(max_new_tokens=4, num_beams=2,
                                                                                  repetition_penalty=1.3))
    assert len(beams) == 1


# -- the report stage's pieces: packing, drafts, targets, bundles, decoding settings, init_from

def _tiny_cfg(lm_dir, connector="prefix", **lm):
    from medfuse_core.config import ReportModelConfig

    return ReportModelConfig.model_validate({"vision": {"name": "resnet18"},
                                             "lm": {"name_or_path": lm_dir, **lm},
                                             "connector": {"name": connector, "num_queries": 4, "heads": 2}})


def test_a_padded_context_changes_nothing_packed_rows_are_contiguous(lm_dir):
    from medfuse_core.models.report import build_report_model

    torch.manual_seed(0)
    model = build_report_model(_tiny_cfg(lm_dir), 48, load_weights=False).eval()
    tokenizer = load_tokenizer(lm_dir)
    images = torch.randn(1, 1, 48, 48)
    report = tokenizer(REPORTS[:1], add_special_tokens=False, return_tensors="pt")
    ctx = tokenizer(["Indication: cough"], add_special_tokens=False, return_tensors="pt")
    short = model(images, report["input_ids"], report["attention_mask"], context_ids=ctx["input_ids"],
                  context_mask=ctx["attention_mask"])["loss"]
    pad = torch.full((1, 7), tokenizer.pad_token_id)
    padded = model(images, report["input_ids"], report["attention_mask"],
                   context_ids=torch.cat([ctx["input_ids"], pad], 1),
                   context_mask=torch.cat([ctx["attention_mask"], torch.zeros_like(pad)], 1))["loss"]
    assert torch.allclose(short, padded, atol=1e-5)
    # and a batch drafts row 0 as it drafts it alone (left-packed for generation)
    two = torch.cat([images, torch.randn(1, 1, 48, 48)])
    long_ctx = tokenizer(["Indication: cough", "Indication: a much longer history of fever and chest pain"],
                         add_special_tokens=False, padding=True, return_tensors="pt")
    d = DecodingConfig(max_new_tokens=5)
    both = model.generate(two, tokenizer, d, long_ctx["input_ids"], long_ctx["attention_mask"])
    alone = model.generate(images, tokenizer, d, ctx["input_ids"], ctx["attention_mask"])
    assert both[0] == alone[0]


def test_drafts_always_have_findings_and_impression(lm_dir):
    from medfuse_core.evaluation.report_metrics import has_findings_and_impression
    from medfuse_core.models.report import build_report_model, draft_reports

    torch.manual_seed(1)
    model = build_report_model(_tiny_cfg(lm_dir), 48, load_weights=False).eval()
    drafts = draft_reports(model, torch.randn(3, 1, 48, 48), load_tokenizer(lm_dir), DecodingConfig(max_new_tokens=4))
    assert len(drafts) == 3 and all(has_findings_and_impression(d) for d in drafts), drafts


def test_targets_end_with_the_end_token_unless_truncated(lm_dir):
    from medfuse_core.objectives.report_generation import encode_targets, report_tokenizer

    tokenizer = report_tokenizer(lm_dir)
    enc = encode_targets(tokenizer, ["FINDINGS: clear.", "FINDINGS: " + "very " * 50 + "long."], 12)
    n0 = int(enc["attention_mask"][0].sum())
    assert enc["input_ids"][0, n0 - 1] == tokenizer.eos_token_id
    assert int(enc["attention_mask"][1].sum()) == 12 and enc["input_ids"][1, -1] != tokenizer.eos_token_id


def test_a_minilm_decoder_report_bundle_round_trips(tmp_path):
    """The packaged MiniLM as a decoder (tied LM head) saves and loads strictly; drafts agree."""
    from medfuse_core.models.bundle import load_bundle, save_bundle
    from medfuse_core.models.report import build_report_model, draft_reports
    from medfuse_core.objectives.report_generation import report_tokenizer

    torch.manual_seed(0)
    cfg = _tiny_cfg("minilm", trainable_layers=1)
    model = build_report_model(cfg, 48).eval()
    tokenizer = report_tokenizer("minilm")
    state = {k: v.clone() for k, v in model.state_dict().items()}  # as the training loop passes it (tied names too)
    save_bundle(model, cfg, [], 48, tmp_path / "b", tokenizer=tokenizer, state_dict=state,
                extra={"objective": "report_lm", "decoding": {"max_new_tokens": 6}})
    loaded = load_bundle(tmp_path / "b")
    assert loaded.kind == "report" and loaded.tokenizer.eos_token == tokenizer.eos_token
    images = torch.randn(2, 1, 48, 48)
    d = DecodingConfig(max_new_tokens=6)
    assert draft_reports(loaded.model, images, loaded.tokenizer, d) == draft_reports(model, images, tokenizer, d)


def test_decoding_overrides_are_checked_by_key(lm_dir):
    from types import SimpleNamespace

    from medfuse_core.config import ConfigError
    from medfuse_core.evaluation.report_inference import decoding_settings

    bundle = SimpleNamespace(extra={"decoding": {"max_new_tokens": 40, "num_beams": 1}})
    s = decoding_settings(bundle, ["decoding.num_beams=3"])
    assert s.num_beams == 3 and s.max_new_tokens == 40
    with pytest.raises(ConfigError, match="decoding.num_beams"):
        decoding_settings(bundle, ["decoding.num_beams=0"])
    with pytest.raises(ConfigError, match="decoding.beams"):
        decoding_settings(bundle, ["decoding.beams=2"])
    with pytest.raises(ConfigError, match="train.lr"):
        decoding_settings(bundle, ["train.lr=1"])


def test_init_from_takes_the_vision_encoder_of_a_stage1_model_and_refuses_lora_report_models(lm_dir, tmp_path):
    from medfuse_core.config import PretrainModelConfig
    from medfuse_core.models.bundle import save_bundle
    from medfuse_core.models.contrastive import build_contrastive_model
    from medfuse_core.models.report import build_report_model
    from medfuse_core.objectives.report_generation import report_init_state

    pcfg = PretrainModelConfig.model_validate({"vision": {"name": "resnet18"}, "text": {"name_or_path": lm_dir},
                                               "embed_dim": 16})
    stage1 = build_contrastive_model(pcfg, 48, "infonce", load_vision_weights=False)
    save_bundle(stage1, pcfg, [], 48, tmp_path / "s1")
    state = report_init_state(str(tmp_path / "s1"))
    assert state and all(k.startswith("vision_encoder.") for k in state)
    model = build_report_model(_tiny_cfg(lm_dir), 48, load_weights=False, init_state=state)
    key = next(iter(state))
    assert torch.equal(model.state_dict()[key], state[key])

    lora_cfg = _tiny_cfg(lm_dir, trainable_layers=0, lora={"r": 2, "target_modules": ["q_proj", "v_proj"]})
    lora_model = build_report_model(lora_cfg, 48, load_weights=False)
    assert not any(p.requires_grad for n, p in lora_model.lm.named_parameters() if "lora_" not in n)
    save_bundle(lora_model, lora_cfg, [], 48, tmp_path / "lora")
    with pytest.raises(ValueError, match="LoRA"):
        report_init_state(str(tmp_path / "lora"))


def test_report_experiments_validate_and_name_bad_keys():
    from pathlib import Path

    from medfuse_core.config import ConfigError, ReportConfig
    from medfuse_core.experiment import load_config

    exp = Path(__file__).resolve().parents[1] / "experiments"
    for name in ("report_cxr_cpu.yaml", "report_cxr_gpu.yaml", "report_projector_gpu.yaml"):
        assert load_config(exp / name, schema=ReportConfig).objective.name == "report_lm"
    with pytest.raises(ConfigError, match="model.connector.name"):
        load_config(exp / "report_cxr_cpu.yaml", ["model.connector.name=perceiver"], schema=ReportConfig)
    with pytest.raises(ConfigError, match="objective.name"):
        load_config(exp / "report_cxr_cpu.yaml", ["objective.name=bce"], schema=ReportConfig)
    with pytest.raises(ConfigError, match="decoding.candidates"):  # reranking reads a guided model's flags
        load_config(exp / "report_cxr_cpu.yaml", ["model.guidance.enabled=false"], schema=ReportConfig)
    with pytest.raises(ConfigError, match="decoding.flag_agreement"):  # so does stating the flags
        load_config(exp / "report_cxr_cpu.yaml", ["model.guidance.enabled=false", "decoding.candidates=1"],
                    schema=ReportConfig)
    unguided = load_config(exp / "report_cxr_cpu.yaml", ["model.guidance.enabled=false", "decoding.candidates=1",
                                                         "decoding.flag_agreement=none"], schema=ReportConfig)
    assert unguided.decoding.candidates == 1 and unguided.decoding.flag_agreement == "none"
