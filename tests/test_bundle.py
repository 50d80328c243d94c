"""Model bundles: save -> load round trip, offline and weights-only."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from transformers import BertConfig

from medfuse_core.config import FusionConfig, HeadConfig, ModelConfig, TextConfig, VisionConfig
from medfuse_core.models import LoadedBundle, build_model, load_bundle, load_tokenizer, save_bundle

LABELS = ["Atelectasis", "Cardiomegaly", "Edema"]
# tiny random text encoder with MiniLM's vocabulary, so the real tokenizer fits it
TINY_TEXT = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def _cfg(name_or_path: str = "minilm", weights_path=None) -> ModelConfig:
    return ModelConfig(
        vision=VisionConfig(name="resnet18", in_channels=1, weights_path=weights_path),
        text=TextConfig(name_or_path=name_or_path, trainable_layers=1),
        fusion=FusionConfig(name="co_attention", dim=32, heads=2, layers=1, dropout=0.1),
        head=HeadConfig(hidden=16, dropout=0.1),
    )


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


def _inputs(tokenizer):
    batch = tokenizer(["no acute findings", "bibasilar atelectasis, mild edema", ""], padding=True, return_tensors="pt")
    images = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    return images, batch["input_ids"], batch["attention_mask"], torch.tensor([True, True, False])


def _logits(model, inputs):
    with torch.no_grad():
        return model(*inputs)["logits"]


def test_round_trip_gives_identical_logits(tmp_path, tokenizer):
    torch.manual_seed(0)
    model = build_model(_cfg(), len(LABELS), 64, text_config=TINY_TEXT)
    model.train()
    # take a step so BatchNorm statistics and weights differ from any fresh init
    inputs = _inputs(tokenizer)
    model(*inputs)["logits"].sum().backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-0.01)
    model.eval()
    expected = _logits(model, inputs)
    out = save_bundle(model, _cfg(), LABELS, 64, tmp_path / "bundle", extra={"thresholds": np.array([0.3, 0.5, 0.7])})
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "medfuse_model.json", "text_encoder"}

    torch.manual_seed(123)  # a different random init must be fully overwritten
    loaded = load_bundle(out)
    assert isinstance(loaded, LoadedBundle)
    assert not loaded.model.training
    assert loaded.label_names == LABELS and loaded.image_size == 64
    assert loaded.model_config == _cfg()
    assert loaded.extra == {"thresholds": [0.3, 0.5, 0.7]}
    assert torch.equal(_logits(loaded.model, inputs), expected)
    # the bundled tokenizer encodes like the original
    assert loaded.tokenizer("small effusion")["input_ids"] == tokenizer("small effusion")["input_ids"]


def test_load_uses_no_pickle(tmp_path, tokenizer, monkeypatch):
    model = build_model(_cfg(), len(LABELS), 64, text_config=TINY_TEXT).eval()
    save_bundle(model, _cfg(), LABELS, 64, tmp_path, tokenizer=tokenizer)
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.bin")) and not list(tmp_path.rglob("*.pkl"))

    def forbidden(*args, **kwargs):
        raise AssertionError("pickle-based loading used")

    for mod, name in [(pickle, "load"), (pickle, "loads"), (torch, "load")]:
        monkeypatch.setattr(mod, name, forbidden)
    loaded = load_bundle(tmp_path)
    assert torch.equal(_logits(loaded.model, _inputs(tokenizer)), _logits(model, _inputs(tokenizer)))


def test_bundle_is_self_contained(tmp_path, tokenizer):
    """Neither the original text model path nor the vision weights file is needed to load."""
    weights = tmp_path / "resnet.pt"
    import torchvision

    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    cfg = _cfg(name_or_path=str(tmp_path / "gone-text-model"), weights_path=str(weights))
    model = build_model(cfg, len(LABELS), 64, text_config=TINY_TEXT).eval()
    save_bundle(model, cfg, LABELS, 64, tmp_path / "b", tokenizer=tokenizer)
    weights.unlink()
    loaded = load_bundle(tmp_path / "b")
    assert loaded.model_config.vision.weights_path == str(weights)  # recorded, not needed
    assert torch.equal(_logits(loaded.model, _inputs(tokenizer)), _logits(model, _inputs(tokenizer)))
    meta = json.loads((tmp_path / "b" / "medfuse_model.json").read_text())
    assert meta["label_names"] == LABELS and meta["model_config"]["fusion"]["name"] == "co_attention"


def test_save_rejects_label_count_mismatch(tmp_path, tokenizer):
    model = build_model(_cfg(), len(LABELS), 64, text_config=TINY_TEXT)
    with pytest.raises(ValueError, match="label names"):
        save_bundle(model, _cfg(), LABELS[:2], 64, tmp_path, tokenizer=tokenizer)


def test_load_rejects_non_bundle(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a medfuse bundle"):
        load_bundle(tmp_path)


def test_image_only_bundle_round_trip(tmp_path):
    """No text encoder: no text_encoder/ folder, tokenizer None, identical logits, image-only scoring."""
    from medfuse_core.evaluation.inference import predict_probabilities, score_rows

    cfg = ModelConfig(vision=VisionConfig(name="resnet18", in_channels=1), text=TextConfig(name_or_path="none"),
                      fusion=FusionConfig(name="image_only", dim=32, heads=2), head=HeadConfig(hidden=0))
    torch.manual_seed(0)
    model = build_model(cfg, len(LABELS), 64).eval()
    images = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    expected = _logits(model, (images,))
    out = save_bundle(model, cfg, LABELS, 64, tmp_path / "bundle")
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "medfuse_model.json"}
    assert json.loads((out / "medfuse_model.json").read_text())["format_version"] == 1
    loaded = load_bundle(out)
    assert loaded.tokenizer is None and loaded.model.text_encoder is None
    assert loaded.model_config == cfg
    assert torch.equal(_logits(loaded.model, (images,)), expected)

    pixels = np.random.default_rng(0).random((3, 64, 64)).astype(np.float32)
    with_text = predict_probabilities(loaded, pixels, ["cough", "fever", ""])
    np.testing.assert_array_equal(with_text, predict_probabilities(loaded, pixels, None))
    rows = {"image": [p.astype(np.float16).tobytes() for p in pixels], "image_size": [64] * 3,
            "context": ["cough", "", "fever"]}
    scores = score_rows(loaded, rows)
    np.testing.assert_array_equal(scores["image_only"], scores["image_text"])


def test_image_skip_adds_a_linear_readout_and_round_trips(tmp_path):
    """model.head.image_skip: logits = head(fused) + a linear read-out of the pooled vision features."""
    cfg = ModelConfig(vision=VisionConfig(name="resnet18", in_channels=1), text=TextConfig(name_or_path="none"),
                      fusion=FusionConfig(name="gated", dim=32, heads=2), head=HeadConfig(image_skip=True))
    torch.manual_seed(0)
    model = build_model(cfg, len(LABELS), 64).eval()
    images = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        features = model.vision_encoder(images)
        fused = model.fusion(model.encode_image(images), features.new_zeros(2, 0, 32),
                             torch.zeros(2, 0, dtype=torch.bool)).fused
        expected = model.head(fused) + model.image_head(features.mean(dim=1))
    torch.testing.assert_close(_logits(model, (images,)), expected)
    loaded = load_bundle(save_bundle(model, cfg, LABELS, 64, tmp_path / "bundle"))
    assert loaded.model_config.head.image_skip and loaded.model.image_head is not None
    assert torch.equal(_logits(loaded.model, (images,)), _logits(model, (images,)))
    plain = build_model(cfg.model_copy(update={"head": HeadConfig()}), len(LABELS), 64)
    assert plain.image_head is None and "image_head.weight" not in plain.state_dict()
