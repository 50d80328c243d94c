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
