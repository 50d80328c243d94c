"""A decoder-only causal LM as the text side: pooling, padding, LoRA, activation checkpointing, bundles.

The LMs are small ones of real families built from transformers configs, saved to a folder
and loaded by path (``medfuse_core.models.tiny_lm``), exactly as a downloaded model would be.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from medfuse_core.config import ConfigError, ModelConfig, PretrainModelConfig
from medfuse_core.experiment import load_config
from medfuse_core.models.bundle import WEIGHTS_FILE, load_bundle, save_bundle
from medfuse_core.models.contrastive import build_contrastive_model
from medfuse_core.models.diagnosis import build_model
from medfuse_core.models.text import (TextEncoder, is_decoder_only, last_token_pool, load_tokenizer,
                                      resolve_text_model)
from medfuse_core.models.tiny_lm import FAMILIES, save_tiny_causal_lm

TEXTS = ["cough", "a much longer clinical context: fever, chills and shortness of breath"]


@pytest.fixture(scope="module")
def lm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("lms")
    return {family: str(save_tiny_causal_lm(root / family, family)) for family in FAMILIES}


def _encode(tokenizer, side, texts=TEXTS, length=24):
    tokenizer.padding_side = side
    enc = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"].bool()


def test_decoder_only_models_are_told_from_encoders(lm_dirs):
    from transformers import AutoConfig

    for path in lm_dirs.values():
        assert is_decoder_only(AutoConfig.from_pretrained(path))
    assert not is_decoder_only(AutoConfig.from_pretrained(resolve_text_model("minilm")))


def test_tokenizer_without_pad_token_pads_with_eos(lm_dirs):
    from transformers import AutoTokenizer

    path = lm_dirs["llama"]
    assert AutoTokenizer.from_pretrained(path).pad_token is None  # as released LLM tokenizers are
    tokenizer = load_tokenizer(path)
    assert tokenizer.pad_token == tokenizer.eos_token
    ids, mask = _encode(tokenizer, "right")
    assert ids.shape == (2, 24) and mask[0].sum() < mask[1].sum()


def test_last_token_pool_left_and_right_padding():
    hidden = torch.arange(2 * 4 * 1, dtype=torch.float32).reshape(2, 4, 1)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_pool(hidden, right).flatten().tolist() == [1.0, 7.0]
    assert last_token_pool(hidden, left).flatten().tolist() == [3.0, 7.0]
    assert last_token_pool(hidden, torch.zeros(2, 4, dtype=torch.bool)).abs().sum() == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_text_is_the_same_left_or_right_padded(lm_dirs, family):
    encoder = TextEncoder(lm_dirs[family]).eval()
    assert encoder.decoder and encoder.pooling == "last"
    tokenizer = load_tokenizer(lm_dirs[family])
    pooled = {}
    with torch.no_grad():
        for side in ("left", "right"):
            ids, mask = _encode(tokenizer, side)
            pooled[side] = encoder.pool(encoder(ids, mask), mask)
    assert pooled["left"].abs().mean() > 0.1
    torch.testing.assert_close(pooled["left"], pooled["right"], atol=1e-5, rtol=1e-4)


def test_lora_trains_only_adapters_and_round_trips_through_a_bundle(lm_dirs, tmp_path):
    cfg = ModelConfig.model_validate({"text": {"name_or_path": lm_dirs["llama"], "lora": {"r": 4, "alpha": 8},
                                               "gradient_checkpointing": True, "max_tokens": 24},
                                      "fusion": {"name": "cross_attention", "dim": 32, "heads": 2}})
    model = build_model(cfg, 3, 48)
    trainable = [n for n, p in model.text_encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    tokenizer = load_tokenizer(lm_dirs["llama"])
    ids, mask = _encode(tokenizer, "right")
    images = torch.randn(2, 1, 48, 48)
    model.train()
    model(images, ids, mask)["logits"].sum().backward()
    lora_b = [p for n, p in model.text_encoder.named_parameters() if "lora_B" in n]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora_b)
    frozen = [p for n, p in model.text_encoder.named_parameters() if "lora_" not in n]
    assert all(p.grad is None for p in frozen)

    with torch.no_grad():  # trained-looking adapters: the round trip must carry them
        for p in lora_b:
            p.normal_(std=0.5)
    model.eval()
    with torch.no_grad():
        before = model(images, ids, mask)["logits"]
    out = save_bundle(model, cfg, ["A", "B", "C"], 48, tmp_path / "bundle", tokenizer=tokenizer)
    with safe_open(str(out / WEIGHTS_FILE), "pt") as fh:
        assert any("lora_B" in key for key in fh.keys())
    loaded = load_bundle(out)
    with torch.no_grad():
        after = loaded.model(images, ids, mask)["logits"]
    torch.testing.assert_close(before, after)


def test_activation_checkpointing_gives_the_same_gradients(lm_dirs):
    tokenizer = load_tokenizer(lm_dirs["gpt2"])
    ids, mask = _encode(tokenizer, "right")
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        encoder = TextEncoder(lm_dirs["gpt2"], gradient_checkpointing=checkpointing)
        encoder.model.config.attn_pdrop = encoder.model.config.resid_pdrop = 0.0
        encoder.eval()  # no dropout: the recomputed forward equals the first one
        encoder.pool(encoder(ids, mask), mask).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in encoder.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1])


def test_contrastive_model_pools_a_decoder_on_its_last_token(lm_dirs):
    cfg = PretrainModelConfig.model_validate({"text": {"name_or_path": lm_dirs["qwen2"]}, "embed_dim": 16})
    model = build_contrastive_model(cfg, 48, "infonce").eval()
    tokenizer = load_tokenizer(lm_dirs["qwen2"])
    with torch.no_grad():
        left = model.encode_texts(*_encode(tokenizer, "left"))
        right = model.encode_texts(*_encode(tokenizer, "right"))
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-4)


def test_lora_with_partly_trainable_base_is_a_config_error(lm_dirs):
    from tests.conftest import CPU_EXPERIMENT

    with pytest.raises(ConfigError, match="trainable_layers"):
        load_config(CPU_EXPERIMENT, [f"model.text.name_or_path={lm_dirs['llama']}", "model.text.lora.r=8",
                                         "model.text.trainable_layers=2"])


def test_unknown_lora_target_is_named(lm_dirs):
    cfg = ModelConfig.model_validate({"text": {"name_or_path": lm_dirs["llama"],
                                               "lora": {"r": 4, "target_modules": ["no_such_proj"]}}})
    with pytest.raises(ValueError, match="target_modules"):
        build_model(cfg, 3, 48)


@pytest.mark.slow
@pytest.mark.heavy  # 1-3 min on 2 cores: keeps the default run under 20 min; CI runs -m heavy
def test_lora_causal_lm_trains_under_zero3_with_accumulation(lm_dirs, tiny_data, tmp_path):
    """A causal LM with LoRA through the whole path: Ray Train, DeepSpeed ZeRO-3 on 2 workers,
    gradient accumulation, every rank's shards in one checkpoint, a bundle that loads without DeepSpeed."""
    import json

    from pipelines import finetune
    from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES + [
        f"model.text.name_or_path={lm_dirs['llama']}", "model.text.lora.r=4", "model.text.gradient_checkpointing=true",
        "deepspeed.zero_stage=3", "train.ema_decay=0", "train.epochs=1", "train.batch_size=4", "train.grad_accum_steps=2"])
    facts = finetune.run(cfg, tiny_data, tmp_path / "w")
    [(state, folder)] = finetune.find_checkpoints(facts["checkpoint_storage"])
    n_train, _ = finetune.check_data(cfg, json.loads((tiny_data / "ingest_summary.json").read_text()))
    assert state["global_step"] == n_train // (2 * 4 * 2)  # optimizer steps: micro-batches / accumulation
    shards = sorted(p.name for p in (folder / "deepspeed").iterdir() if "optim_states" in p.name)
    assert any("rank_0" in n for n in shards) and any("rank_1" in n for n in shards), shards
    bundle = load_bundle(tmp_path / "w" / "model")
    assert bundle.model.text_encoder.decoder and bundle.model.text_encoder.lora is not None
    with safe_open(str(tmp_path / "w" / "model" / WEIGHTS_FILE), "pt") as fh:
        assert any("lora_A" in key for key in fh.keys())
