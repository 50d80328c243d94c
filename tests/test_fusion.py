"""Fusion modules: shapes, text-padding masking, missing text, attention maps, gradients."""

from __future__ import annotations

import pytest
import torch

from medfuse_core.models.fusion import FUSION_MODULES, FusionOutput, MultiHeadAttention, build_fusion

DIM, HEADS, LAYERS = 16, 2, 2
B, NI, NT = 3, 5, 4
# the cross-modal modules; "image_only" reads no text and has its own tests below
NAMES = [n for n in FUSION_MODULES.names() if n != "image_only"]


def _module(name: str, dropout: float = 0.0):
    torch.manual_seed(0)
    return build_fusion(name, dim=DIM, heads=HEADS, layers=LAYERS, dropout=dropout)


def _inputs():
    g = torch.Generator().manual_seed(1)
    img = torch.randn(B, NI, DIM, generator=g)
    txt = torch.randn(B, NT, DIM, generator=g)
    mask = torch.tensor(
        [
            [True, True, True, False],  # padded tail
            [True, False, False, False],  # a single real token
            [False, False, False, False],  # no text for this study
        ]
    )
    return img, txt, mask


def test_registry_has_required_modules():
    assert {"concat", "gated", "cross_attention", "co_attention"} <= set(NAMES)
    assert "image_only" in FUSION_MODULES


def test_image_only_is_the_mean_image_token_and_ignores_text():
    module = _module("image_only").eval()
    img, txt, mask = _inputs()
    out = module(img, txt, mask)
    assert isinstance(out, FusionOutput) and out.attention == {}
    assert out.fused.shape == (B, module.out_dim) == (B, DIM)
    torch.testing.assert_close(out.fused, img.mean(dim=1))
    assert torch.equal(module(img, txt * 100.0, ~mask).fused, out.fused)  # text is not read
    assert torch.equal(module(img, txt[:, :0], mask[:, :0]).fused, out.fused)  # zero-length text works
    assert torch.equal(module(img).fused, out.fused)  # and no text at all
    assert not list(module.parameters()) and module.uses_text is False


@pytest.mark.parametrize("name", NAMES)
def test_output_shapes(name):
    module = _module(name).eval()
    img, txt, mask = _inputs()
    out = module(img, txt, mask)
    assert isinstance(out, FusionOutput)
    assert out.fused.shape == (B, module.out_dim)
    for key, attn in out.attention.items():
        expected = {"image_to_text": (B, NI, NT), "text_to_image": (B, NT, NI)}[key]
        assert attn.shape == expected


@pytest.mark.parametrize("name", NAMES)
def test_padded_text_values_do_not_matter(name):
    module = _module(name).eval()
    img, txt, mask = _inputs()
    ref = module(img, txt, mask)
    noisy = txt.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), DIM) * 100.0
    out = module(img, noisy, mask)
    assert torch.equal(ref.fused, out.fused)
    for key in ref.attention:
        assert torch.equal(ref.attention[key], out.attention[key])


@pytest.mark.parametrize("name", NAMES)
def test_attention_on_padding_is_zero(name):
    module = _module(name).eval()
    img, txt, mask = _inputs()
    attention = module(img, txt, mask).attention
    if "image_to_text" in attention:
        i2t = attention["image_to_text"]
        assert torch.all(i2t.transpose(1, 2)[~mask] == 0)
        assert torch.all(i2t[mask.any(1)].sum(-1) <= 1 + 1e-5)  # the rest goes to the null token
        assert torch.all(i2t[0].sum(-1) > 0)
    if "text_to_image" in attention:
        t2i = attention["text_to_image"]
        assert torch.all(t2i[~mask] == 0)
        torch.testing.assert_close(t2i[mask].sum(-1), torch.ones(int(mask.sum())))


@pytest.mark.parametrize("name", NAMES)
def test_missing_text_is_finite(name):
    module = _module(name, dropout=0.1).train()
    img, txt, _ = _inputs()
    img.requires_grad_(True)
    none = torch.zeros(B, NT, dtype=torch.bool)
    out = module(img, txt, none)
    assert torch.isfinite(out.fused).all()
    out.fused.sum().backward()
    assert torch.isfinite(img.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    # zero-length text (image-only batches) works too
    empty = module(img, txt[:, :0], none[:, :0])
    assert empty.fused.shape == (B, module.out_dim) and torch.isfinite(empty.fused).all()


@pytest.mark.parametrize("name", NAMES)
def test_missing_text_equals_zero_length_text(name):
    module = _module(name).eval()
    img, txt, _ = _inputs()
    masked = module(img, txt, torch.zeros(B, NT, dtype=torch.bool)).fused
    empty = module(img, txt[:, :0], torch.zeros(B, 0, dtype=torch.bool)).fused
    torch.testing.assert_close(masked, empty, rtol=1e-5, atol=1e-6)


def test_co_attention_returns_both_directions():
    img, txt, mask = _inputs()
    attention = _module("co_attention").eval()(img, txt, mask).attention
    assert set(attention) == {"image_to_text", "text_to_image"}


def test_cross_attention_returns_image_to_text():
    img, txt, mask = _inputs()
    assert set(_module("cross_attention").eval()(img, txt, mask).attention) == {"image_to_text"}


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_both_modalities(name):
    module = _module(name, dropout=0.1).train()
    img, txt, mask = _inputs()
    img.requires_grad_(True)
    txt.requires_grad_(True)
    module(img, txt, mask).fused.pow(2).sum().backward()
    assert img.grad.abs().sum() > 0
    assert txt.grad[mask].abs().sum(-1).gt(0).all()  # every real text token gets a gradient
    assert torch.all(txt.grad[~mask] == 0)  # padding gets none
    assert module.null_text.grad is not None and module.null_text.grad.abs().sum() > 0


def test_attention_fully_masked_row_is_finite():
    attn = MultiHeadAttention(8, 2)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    out, weights = attn(q, kv, torch.zeros(2, 4, dtype=torch.bool))
    assert torch.isfinite(out).all() and torch.all(weights == 0)
