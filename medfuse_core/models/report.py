"""Report generation: a causal language model conditioned on the image (and the clinical context).

The vision encoder's tokens reach the LM through a connector, chosen by name from
:data:`CONNECTORS`, that turns them into ``prefix`` embeddings in the LM's embedding space:

* ``prefix`` (LLaVA style): a two-layer MLP projects every vision token; the LM reads them all.
* ``cross_attention`` (BLIP-2 / Flamingo-resampler style): a fixed number of learned queries
  cross-attend over the vision tokens, so the LM reads ``num_queries`` tokens whatever the grid.

The sequence the LM sees is ``[prefix] [context tokens] [report tokens]``; teacher forcing
scores only the report tokens (every other position has label -100). Generation feeds the
prefix (and context) as ``inputs_embeds`` to ``generate``, with the decoding settings given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from medfuse_core.registry import Registry

CONNECTORS: Registry = Registry("report connector")
IGNORE = -100


class PrefixProjector(nn.Module):
    """Vision tokens ``[B, N, Dv]`` -> ``[B, N, H]`` through Linear-GELU-Linear (LLaVA-1.5's projector)."""

    def __init__(self, vision_dim: int, lm_dim: int, **_):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)


class QueryResampler(nn.Module):
    """``num_queries`` learned queries cross-attending over the vision tokens -> ``[B, Q, H]``."""

    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 32, heads: int = 8, **_):
        super().__init__()
        heads = max(1, min(heads, lm_dim))
        while lm_dim % heads:
            heads -= 1
        self.queries = nn.Parameter(torch.randn(num_queries, lm_dim) * 0.02)
        self.kv = nn.Linear(vision_dim, lm_dim)
        self.attn = nn.MultiheadAttention(lm_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(lm_dim)
        self.mlp = nn.Sequential(nn.Linear(lm_dim, 4 * lm_dim), nn.GELU(), nn.Linear(4 * lm_dim, lm_dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        kv = self.kv(tokens)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)
        x = q + self.attn(q, kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm(x))


CONNECTORS.register("prefix")(PrefixProjector)
CONNECTORS.register("cross_attention")(QueryResampler)


@dataclass(frozen=True)
class DecodingConfig:
    """Decoding settings passed to ``generate``."""

    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0


class ReportGenerator(nn.Module):
    """Vision encoder + connector + causal LM (``AutoModelForCausalLM``).

    ``forward(images, input_ids, attention_mask, labels_mask, context_ids=None, context_mask=None)``
    returns the mean cross-entropy over report tokens (``labels_mask`` True) and the logits.
    """

    def __init__(self, vision_encoder: nn.Module, lm: nn.Module, connector: str = "prefix", **connector_args):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.lm = lm
        hidden = lm.get_input_embeddings().embedding_dim
        self.connector_name = connector
        self.connector = CONNECTORS.get(connector)(vision_encoder.out_dim, hidden, **connector_args)

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The image as LM input embeddings ``[B, P, H]``."""
        return self.connector(self.vision_encoder(images))

    def _inputs(self, images, ids, mask, context_ids, context_mask):
        embed = self.lm.get_input_embeddings()
        prefix = self.prefix(images).to(embed.weight.dtype)
        parts, masks = [prefix], [torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)]
        if context_ids is not None:
            parts.append(embed(context_ids))
            masks.append(context_mask.long())
        if ids is not None:
            parts.append(embed(ids))
            masks.append(mask.long())
        return torch.cat(parts, 1), torch.cat(masks, 1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels_mask: Optional[torch.Tensor] = None, context_ids: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        embeds, mask = self._inputs(images, input_ids, attention_mask, context_ids, context_mask)
        report_mask = attention_mask.bool() if labels_mask is None else labels_mask.bool() & attention_mask.bool()
        labels = torch.full(mask.shape, IGNORE, dtype=torch.long, device=mask.device)
        labels[:, -input_ids.shape[1]:] = torch.where(report_mask, input_ids, torch.full_like(input_ids, IGNORE))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, labels=labels,
                      use_cache=False)
        return {"loss": out.loss, "logits": out.logits}

    @torch.no_grad()
    def generate(self, images: torch.Tensor, tokenizer, decoding: DecodingConfig = DecodingConfig(),
                 context_ids: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                 prompt_ids: Optional[torch.Tensor] = None) -> list[str]:
        """Draft reports (decoded text, special tokens removed) for a batch of images."""
        prompt_mask = None if prompt_ids is None else torch.ones_like(prompt_ids)
        embeds, mask = self._inputs(images, prompt_ids, prompt_mask, context_ids, context_mask)
        kwargs = dict(max_new_tokens=decoding.max_new_tokens, num_beams=decoding.num_beams,
                      do_sample=decoding.do_sample, repetition_penalty=decoding.repetition_penalty,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
        if decoding.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]
