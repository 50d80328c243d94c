"""Cross-modal fusion modules over already-projected tokens of width ``dim``.

Every module in :data:`FUSION_MODULES` is built as ``cls(dim=, heads=, layers=, dropout=)``
and called as ``module(img_tokens [B,Ni,dim], txt_tokens [B,Nt,dim], txt_mask [B,Nt])``
(``txt_mask`` True = real token) returning a :class:`FusionOutput` with ``fused
[B, out_dim]`` and head-averaged attention maps.

Text padding and missing text
-----------------------------
* Padded text positions are zeroed on entry and masked wherever they could act:
  as attention keys (weight exactly 0), as attention queries (their rows of the
  reported maps are 0) and in pooling (excluded). Changing their values therefore
  cannot change any output.
* A row whose mask is all False (or ``Nt == 0``) means "no text for this study".
  Every module owns a learned **null text** embedding:

  - attention modules prepend it as a text token that is never masked, so a softmax
    over text keys always has a valid entry (no NaN); it also lets image tokens
    "attend to nothing" when the report is uninformative;
  - the pooled text vector is the masked mean over real tokens, or the null
    embedding (the null token's output for attention modules) when a row has none.

  Reported attention maps cover the real text positions only (the null column/row
  is dropped), so ``image_to_text`` rows sum to 1 minus the mass on the null token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from medfuse_core.registry import Registry

FUSION_MODULES: Registry[nn.Module] = Registry("fusion module")


@dataclass
class FusionOutput:
    """``fused``: ``[B, out_dim]``; ``attention``: name -> head-averaged map (may be empty)."""

    fused: torch.Tensor
    attention: dict[str, torch.Tensor] = field(default_factory=dict)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens [B,N,D]`` over positions where ``mask [B,N]`` is True; 0 where none."""
    weights = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


def _prepare_text(txt_tokens: torch.Tensor, txt_mask: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if txt_mask is None:
        txt_mask = torch.ones(txt_tokens.shape[:2], dtype=torch.bool, device=txt_tokens.device)
    txt_mask = txt_mask.to(torch.bool)
    if txt_mask.shape != txt_tokens.shape[:2]:
        raise ValueError(f"txt_mask shape {tuple(txt_mask.shape)} does not match text tokens {tuple(txt_tokens.shape[:2])}")
    return txt_tokens.masked_fill(~txt_mask.unsqueeze(-1), 0.0), txt_mask


def _null_parameter(dim: int) -> nn.Parameter:
    param = nn.Parameter(torch.zeros(1, 1, dim))
    nn.init.trunc_normal_(param, std=0.02)
    return param


class MultiHeadAttention(nn.Module):
    """Multi-head attention of queries over keys with a key mask; also returns the weights.

    ``forward(q [B,Nq,D], kv [B,Nk,D], kv_mask [B,Nk] | None) -> (out [B,Nq,D], weights [B,Nq,Nk])``,
    weights averaged over heads, taken before attention dropout, exactly 0 on masked keys.
    """

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.head_dim = dim // heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(
        self, q: torch.Tensor, kv: torch.Tensor, kv_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """See class docstring."""
        qh, kh, vh = self._split(self.q_proj(q)), self._split(self.k_proj(kv)), self._split(self.v_proj(kv))
        scores = (qh @ kh.transpose(-2, -1)) / math.sqrt(self.head_dim)
        if kv_mask is not None:
            blocked = ~kv_mask[:, None, None, :]
            # a finite fill keeps fully-masked rows finite; the explicit zeroing makes masked weights exactly 0
            scores = scores.masked_fill(blocked, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1).masked_fill(blocked, 0.0)
        else:
            probs = scores.softmax(dim=-1)
        out = self.attn_drop(probs) @ vh
        b, _, nq, _ = out.shape
        out = out.transpose(1, 2).reshape(b, nq, self.heads * self.head_dim)
        return self.out_proj(out), probs.mean(dim=1)


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: ``x + Attn(x -> context)``, then ``x + FFN(x)``; returns ``(x, weights)``."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0, ffn_mult: int = 4):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)
        self.drop = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_mult * dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(ffn_mult * dim, dim),
            nn.Dropout(dropout),
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: Optional[torch.Tensor] = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B,Nq,D]`` attends to ``context [B,Nk,D]`` (``context_mask`` True = usable key)."""
        attended, weights = self.attn(self.norm_q(x), self.norm_kv(context), context_mask)
        x = x + self.drop(attended)
        x = x + self.ffn(self.norm_ffn(x))
        return x, weights


class NullToken(nn.Module):
    """The learned null text embedding as its own module.

    Reaching the parameter through a module call (whose output is a plain tensor) lets
    DeepSpeed ZeRO-3 gather it again for the backward pass; a parameter read directly by a
    module that returns a dataclass would be left partitioned.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.null_text = _null_parameter(dim)

    def forward(self, batch: int, dtype: torch.dtype) -> torch.Tensor:
        """``[batch, 1, dim]``."""
        return self.null_text.to(dtype).expand(batch, -1, -1)


class _NullTextFusion(nn.Module):
    """Holds the learned null text embedding and the helpers built on it."""

    def _init_null(self, dim: int) -> None:
        self.null = NullToken(dim)

    @property
    def null_text(self) -> nn.Parameter:
        """The null embedding parameter ``[1, 1, dim]``."""
        return self.null.null_text

    def _with_null(self, txt: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Prepend the never-masked null token: ``[B, 1+Nt, D]``, ``[B, 1+Nt]``."""
        b = txt.shape[0]
        null = self.null(b, txt.dtype)
        keep = torch.ones(b, 1, dtype=torch.bool, device=mask.device)
        return torch.cat([null, txt], dim=1), torch.cat([keep, mask], dim=1)

    def _pool_text(self, txt: torch.Tensor, mask: torch.Tensor, null: torch.Tensor) -> torch.Tensor:
        """Masked mean over real tokens; ``null [B, D]`` for rows without any."""
        has_text = mask.any(dim=1, keepdim=True)
        return torch.where(has_text, masked_mean(txt, mask), null)


@FUSION_MODULES.register("concat")
class ConcatFusion(_NullTextFusion):
    """Mean-pooled image ⊕ masked-mean text (null vector when absent) -> 2-layer MLP.

    ``heads`` and ``layers`` are accepted for a uniform signature and unused.
    """

    def __init__(self, dim: int, heads: int = 1, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self._init_null(dim)
        self.mlp = nn.Sequential(
            nn.LayerNorm(2 * dim),
            nn.Linear(2 * dim, dim),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(dim, dim),
        )
        self.out_dim = dim

    def forward(
        self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: Optional[torch.Tensor] = None
    ) -> FusionOutput:
        """See module docstring."""
        txt, mask = _prepare_text(txt_tokens, txt_mask)
        null = self.null(txt.shape[0], txt.dtype)[:, 0]
        pooled = torch.cat([img_tokens.mean(dim=1), self._pool_text(txt, mask, null)], dim=-1)
        return FusionOutput(self.mlp(pooled), {})


@FUSION_MODULES.register("gated")
class GatedFusion(_NullTextFusion):
    """Gated multimodal unit: ``z * tanh(W_i img) + (1 - z) * tanh(W_t txt)``, ``z = sigmoid(W_z [img; txt])``.

    The gate is per feature. Pooling as in ``concat``; ``heads``/``layers`` unused.
    """

    def __init__(self, dim: int, heads: int = 1, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self._init_null(dim)
        self.norm_img = nn.LayerNorm(dim)
        self.norm_txt = nn.LayerNorm(dim)
        self.img_proj = nn.Linear(dim, dim)
        self.txt_proj = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)
        self.drop = nn.Dropout(dropout)
        self.out_dim = dim

    def forward(
        self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: Optional[torch.Tensor] = None
    ) -> FusionOutput:
        """See module docstring."""
        txt, mask = _prepare_text(txt_tokens, txt_mask)
        null = self.null(txt.shape[0], txt.dtype)[:, 0]
        img_p = self.norm_img(img_tokens.mean(dim=1))
        txt_p = self.norm_txt(self._pool_text(txt, mask, null))
        z = torch.sigmoid(self.gate(torch.cat([img_p, txt_p], dim=-1)))
        fused = z * torch.tanh(self.img_proj(img_p)) + (1.0 - z) * torch.tanh(self.txt_proj(txt_p))
        return FusionOutput(self.drop(fused), {})


@FUSION_MODULES.register("cross_attention")
class CrossAttentionFusion(_NullTextFusion):
    """Image tokens attend to text tokens (+ null token) for ``layers`` blocks, then mean-pooled.

    Attention: ``image_to_text`` ``[B, Ni, Nt]`` from the last block.
    """

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self._init_null(dim)
        self.blocks = nn.ModuleList([CrossAttentionBlock(dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(
        self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: Optional[torch.Tensor] = None
    ) -> FusionOutput:
        """See module docstring."""
        txt, mask = _prepare_text(txt_tokens, txt_mask)
        txt, mask = self._with_null(txt, mask)
        x = img_tokens
        weights = None
        for block in self.blocks:
            x, weights = block(x, txt, mask)
        return FusionOutput(self.norm(x.mean(dim=1)), {"image_to_text": weights[:, :, 1:]})


class CoAttentionLayer(nn.Module):
    """One co-attention layer: image->text and text->image attention computed from the same inputs."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.image_block = CrossAttentionBlock(dim, heads, dropout)
        self.text_block = CrossAttentionBlock(dim, heads, dropout)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, txt_mask: torch.Tensor):
        """Returns ``(img, txt, image_to_text [B,Ni,Nt], text_to_image [B,Nt,Ni])``."""
        new_img, i2t = self.image_block(img, txt, txt_mask)
        new_txt, t2i = self.text_block(txt, img, None)
        return new_img, new_txt, i2t, t2i


@FUSION_MODULES.register("co_attention")
class CoAttentionFusion(_NullTextFusion):
    """Bidirectional co-attention with text padding masked in both directions.

    Each layer updates image tokens by attending to text (padded keys masked) and text
    tokens by attending to image; padded text queries are excluded from pooling and
    their attention rows are reported as 0. Output: ``proj([mean(img); masked_mean(txt)])``
    where the text side falls back to the null token's output for rows without text.

    Attention (last layer): ``image_to_text`` ``[B, Ni, Nt]``, ``text_to_image`` ``[B, Nt, Ni]``.
    """

    def __init__(self, dim: int, heads: int = 4, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self._init_null(dim)
        self.layers = nn.ModuleList([CoAttentionLayer(dim, heads, dropout) for _ in range(layers)])
        self.norm_img = nn.LayerNorm(dim)
        self.norm_txt = nn.LayerNorm(dim)
        self.proj = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())
        self.out_dim = dim

    def forward(
        self, img_tokens: torch.Tensor, txt_tokens: torch.Tensor, txt_mask: Optional[torch.Tensor] = None
    ) -> FusionOutput:
        """See module docstring."""
        txt, real = _prepare_text(txt_tokens, txt_mask)
        txt, mask = self._with_null(txt, real)
        img = img_tokens
        i2t = t2i = None
        for layer in self.layers:
            img, txt, i2t, t2i = layer(img, txt, mask)
        img_p = self.norm_img(img.mean(dim=1))
        txt = self.norm_txt(txt)
        txt_p = self._pool_text(txt[:, 1:], real, txt[:, 0])
        fused = self.proj(torch.cat([img_p, txt_p], dim=-1))
        attention = {
            "image_to_text": i2t[:, :, 1:],
            "text_to_image": t2i[:, 1:, :] * real.unsqueeze(-1).to(t2i.dtype),
        }
        return FusionOutput(fused, attention)


@FUSION_MODULES.register("image_only")
class ImageOnlyFusion(nn.Module):
    """No fusion: the mean of the projected image tokens goes to the head; the text is ignored.

    For image-only models (``model.text.name_or_path: none``) and baselines. Any text
    arguments are accepted and unused (nothing is rejected); ``heads``, ``layers`` and
    ``dropout`` are accepted for a uniform signature. No parameters, no attention maps.
    ``uses_text = False`` lets the model skip the text encoder.
    """

    uses_text = False

    def __init__(self, dim: int, heads: int = 1, layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.out_dim = dim

    def forward(
        self,
        img_tokens: torch.Tensor,
        txt_tokens: Optional[torch.Tensor] = None,
        txt_mask: Optional[torch.Tensor] = None,
    ) -> FusionOutput:
        """See class docstring."""
        return FusionOutput(img_tokens.mean(dim=1), {})


def build_fusion(name: str, dim: int, heads: int, layers: int, dropout: float) -> nn.Module:
    """Instantiate a registered fusion module."""
    return FUSION_MODULES.get(name)(dim=dim, heads=heads, layers=layers, dropout=dropout)
