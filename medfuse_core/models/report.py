"""Report generation: a causal language model conditioned on the image (and the clinical context).

The vision encoder's tokens reach the LM through a connector, chosen by name from
:data:`CONNECTORS`, that turns them into ``prefix`` embeddings in the LM's embedding space:

* ``prefix`` (LLaVA style): a two-layer MLP projects every vision token; the LM reads them all.
* ``cross_attention`` (BLIP-2 / Flamingo-resampler style): a fixed number of learned queries
  cross-attend over the vision tokens, so the LM reads ``num_queries`` tokens whatever the grid.

With guidance (``model.guidance``, PromptMRG-style), a findings head on the pooled vision tokens
scores each label, and the LM also reads the flagged findings as a prompt: the sequence is
``[prefix] [context tokens] [Flagged: ...] [report tokens]``. Training flags the study's labels;
drafts flag the head's probabilities at the thresholds given (chosen on validation).

The sequence the LM sees is ``[prefix] [context tokens] [report tokens]``, packed so each row's
real tokens are contiguous and end the row (padding first, positions counted over real tokens),
so a padded context leaves no gap and the LM head runs on the report positions only; teacher forcing scores
only the report tokens (every other position has label -100). Generation feeds the prefix (and
context) as ``inputs_embeds`` to ``generate``, with the decoding settings given.

A draft always has both sections: generation starts from ``FINDINGS:``, and a draft that ends
without an IMPRESSION is continued from ``... IMPRESSION:`` (the model writes both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

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

    num_labels = 0  # no diagnosis head (the guidance head only steers the drafts)

    def __init__(self, vision_encoder: nn.Module, lm: nn.Module, connector: str = "prefix",
                 guide_labels: Sequence[str] = (), **connector_args):
        super().__init__()
        self.vision_encoder = vision_encoder
        self.lm = lm
        hidden = lm.get_input_embeddings().embedding_dim
        self.connector_name = connector
        self.connector = CONNECTORS.get(connector)(vision_encoder.out_dim, hidden, **connector_args)
        self.guide_labels = tuple(guide_labels)
        self.guide_head = nn.Linear(vision_encoder.out_dim, len(self.guide_labels)) if self.guide_labels else None

    def param_groups(self, lr: float, text_lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups: the language model (``lm.*``) at ``text_lr``, the rest at ``lr``."""
        from medfuse_core.models.param_groups import optimizer_groups

        return optimizer_groups(self, lr, text_lr, weight_decay, text_prefixes=("lm.",))

    def prefix(self, images: torch.Tensor) -> torch.Tensor:
        """The image as LM input embeddings ``[B, P, H]``."""
        return self.connector(self.vision_encoder(images))

    def guide_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The guidance head's logits ``[B, L]`` (one per ``guide_labels`` name)."""
        if self.guide_head is None:
            raise ValueError("this report model has no guidance head (model.guidance.enabled is false)")
        return self.guide_head(self.vision_encoder(images).mean(1))

    def _inputs(self, vision_tokens, parts, labels=None, pad_left=False):
        """``[prefix] + parts`` (``(ids, mask)`` pairs, ``None`` ids skipped) as packed embeddings,
        mask and labels; ``labels`` belong to the last part, every other position is IGNORE."""
        embed = self.lm.get_input_embeddings()
        prefix = self.connector(vision_tokens).to(embed.weight.dtype)
        embeds, masks = [prefix], [torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device)]
        label_parts = [torch.full(prefix.shape[:2], IGNORE, dtype=torch.long, device=prefix.device)]
        for k, (part_ids, part_mask) in enumerate(parts):
            if part_ids is None:
                continue
            embeds.append(embed(part_ids))
            masks.append(part_mask.long())
            scored = labels is not None and k == len(parts) - 1
            label_parts.append(labels if scored else torch.full_like(part_ids, IGNORE))
        return pack(torch.cat(embeds, 1), torch.cat(masks, 1), torch.cat(label_parts, 1), pad_left)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels_mask: Optional[torch.Tensor] = None, context_ids: Optional[torch.Tensor] = None,
                context_mask: Optional[torch.Tensor] = None, guide_ids: Optional[torch.Tensor] = None,
                guide_mask: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        report_mask = attention_mask.bool() if labels_mask is None else labels_mask.bool() & attention_mask.bool()
        labels = torch.where(report_mask, input_ids, torch.full_like(input_ids, IGNORE))
        tokens = self.vision_encoder(images)
        # packed to the right (padding first), so the report ends every row: the LM head (a
        # vocabulary-wide projection, about half a small LM's compute) runs on the last
        # report-width + 1 positions only, the one before the first report token included
        embeds, mask, labels = self._inputs(tokens, [(context_ids, context_mask), (guide_ids, guide_mask),
                                                     (input_ids, attention_mask)], labels, pad_left=True)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        keep = min(input_ids.shape[1] + 1, embeds.shape[1])
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False,
                      logits_to_keep=keep)
        logits, labels = out.logits[:, -keep:], labels[:, -keep:]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                 target.reshape(-1), ignore_index=IGNORE)
        out = {"loss": loss, "logits": logits, "labels": labels}
        if self.guide_head is not None:
            out["guide_logits"] = self.guide_head(tokens.mean(1))
        return out

    @torch.no_grad()
    def generate(self, images: torch.Tensor, tokenizer, decoding: DecodingConfig = DecodingConfig(),
                 context_ids: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                 prompt_ids: Optional[torch.Tensor] = None, prompt_mask: Optional[torch.Tensor] = None,
                 guide_ids: Optional[torch.Tensor] = None, guide_mask: Optional[torch.Tensor] = None) -> list[str]:
        """The text generated after the prompt (special tokens removed) for a batch of images."""
        if prompt_ids is not None and prompt_mask is None:
            prompt_mask = torch.ones_like(prompt_ids)
        embeds, mask, _ = self._inputs(self.vision_encoder(images), [(context_ids, context_mask),
                                                                     (guide_ids, guide_mask), (prompt_ids, prompt_mask)],
                                       pad_left=True)
        kwargs = dict(max_new_tokens=decoding.max_new_tokens, num_beams=decoding.num_beams,
                      do_sample=decoding.do_sample, repetition_penalty=decoding.repetition_penalty,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        if decoding.do_sample:
            kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
        if decoding.no_repeat_ngram_size:
            kwargs["no_repeat_ngram_size"] = decoding.no_repeat_ngram_size
        out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


def pack(embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, pad_left: bool = False):
    """Move each row's real positions together, in order: padding last, or first with
    ``pad_left`` (training and generation), so no masked gap sits between the context and the report."""
    key = mask if pad_left else 1 - mask  # sort puts key 0 first; stable keeps the order of real tokens
    order = torch.sort(key, dim=1, stable=True).indices
    take = order.unsqueeze(-1).expand(-1, -1, embeds.shape[-1])
    return embeds.gather(1, take), mask.gather(1, order), labels.gather(1, order)


FINDINGS_HEADER = "FINDINGS:"
IMPRESSION_HEADER = "IMPRESSION:"
EMPTY_SECTION = "Not stated."  # a section the LM left empty


def report_target(sections: dict, names=("findings", "impression")) -> str:
    """The training target: each named, non-empty section under its header, in order."""
    return " ".join(f"{name.upper()}: {sections[name].strip()}" for name in names if sections.get(name, "").strip())


def _prompts(tokenizer, texts: list[str], device):
    enc = tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


def guide_prompt(names: Sequence[str], flags) -> str:
    """The guidance prompt for one image: ``Flagged: pleural effusion, edema.`` or ``Flagged: none.``"""
    flagged = [n.lower() for n, f in zip(names, flags) if bool(f)]
    return f"Flagged: {', '.join(flagged) if flagged else 'none'}."


def encode_guides(tokenizer, names: Sequence[str], flags, present=None):
    """Guidance prompt token ids and mask for ``flags [B, L]``; rows with ``present`` False get an
    empty (all-masked) prompt."""
    rows = [guide_prompt(names, f) if (present is None or bool(present[k])) else ""
            for k, f in enumerate(flags.tolist() if hasattr(flags, "tolist") else flags)]
    enc = tokenizer(rows, add_special_tokens=False, padding="longest", return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


NO_FINDING_EXCEPT = ("No Finding", "Support Devices")


def guide_flags(model: ReportGenerator, images: torch.Tensor, thresholds: Optional[Sequence[float]] = None):
    """The guidance head's probabilities ``[B, L]`` and flags (at ``thresholds``, else 0.5).

    Flags are kept consistent the way CheXpert labels are: "No Finding" is flagged only when no
    finding other than support devices is (per-finding thresholds alone can flag both, a prompt
    the LM never saw in training)."""
    probs = torch.sigmoid(model.guide_logits(images).float())
    cut = torch.full((probs.shape[1],), 0.5) if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
    flags = probs >= cut.to(probs.device)
    names = list(model.guide_labels)
    if "No Finding" in names:
        others = [j for j, n in enumerate(names) if n not in NO_FINDING_EXCEPT]
        if others:
            flags[:, names.index("No Finding")] &= ~flags[:, others].any(1)
    return probs, flags


def draft_reports(model: ReportGenerator, images: torch.Tensor, tokenizer, decoding: DecodingConfig = DecodingConfig(),
                  context_ids: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                  guide_thresholds: Optional[Sequence[float]] = None,
                  flags: Optional[torch.Tensor] = None) -> list[str]:
    """Draft reports with FINDINGS and IMPRESSION sections for a batch of images.

    Generation starts from ``FINDINGS:``; drafts whose text has no ``IMPRESSION:`` are continued
    from ``FINDINGS: <their text> IMPRESSION:`` (one more pass for those rows only), so both
    sections are the model's. An empty section is written as ``Not stated.``. A guided model
    reads the findings its head flags at ``guide_thresholds`` (0.5 where not given), or
    ``flags`` (``[B, L]`` booleans over ``model.guide_labels``) when given: findings a reader or
    the reference labels supply instead of the head.
    """
    import re

    n = images.shape[0]
    guide_ids = guide_mask = None
    if model.guide_head is not None:
        if flags is None:
            _, flags = guide_flags(model, images, guide_thresholds)
        elif tuple(flags.shape) != (n, len(model.guide_labels)):
            raise ValueError(f"flags: shape {tuple(flags.shape)}, expected ({n}, {len(model.guide_labels)})")
        guide_ids, guide_mask = (t.to(images.device) for t in encode_guides(tokenizer, model.guide_labels, flags))
    ids, mask = _prompts(tokenizer, [FINDINGS_HEADER] * n, images.device)
    bodies = model.generate(images, tokenizer, decoding, context_ids, context_mask, ids, mask, guide_ids, guide_mask)
    split = re.compile(r"\bimpression\s*:", re.IGNORECASE)
    findings, impressions = [], [None] * n
    for k, body in enumerate(bodies):
        parts = split.split(body, maxsplit=1)
        findings.append(re.sub(r"^\s*findings\s*:\s*", "", parts[0], flags=re.IGNORECASE).strip())
        if len(parts) == 2 and parts[1].strip():
            impressions[k] = parts[1].strip()
    todo = [k for k in range(n) if impressions[k] is None]
    if todo:
        idx = torch.tensor(todo, device=images.device)
        texts = [f"{FINDINGS_HEADER} {findings[k]} {IMPRESSION_HEADER}" for k in todo]
        ids, mask = _prompts(tokenizer, texts, images.device)
        sub = (lambda t: None if t is None else t.index_select(0, idx))
        more = model.generate(images.index_select(0, idx), tokenizer, decoding, sub(context_ids), sub(context_mask),
                              ids, mask, sub(guide_ids), sub(guide_mask))
        for k, text in zip(todo, more):
            impressions[k] = split.split(text, maxsplit=1)[0].strip()
    return [f"{FINDINGS_HEADER} {f or EMPTY_SECTION}\n{IMPRESSION_HEADER} {i or EMPTY_SECTION}"
            for f, i in zip(findings, impressions)]


def load_causal_lm(text_cfg, config=None) -> nn.Module:
    """``AutoModelForCausalLM`` by name or local path (``config``: build from it, random weights);
    a BERT-class encoder (e.g. the packaged MiniLM) loads as a decoder (``is_decoder=True``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from medfuse_core.models.text import is_decoder_only, resolve_text_model

    if config is None:
        path = resolve_text_model(text_cfg.name_or_path)
        config = AutoConfig.from_pretrained(path)
        if not is_decoder_only(config):
            config.is_decoder = True
        lm = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=torch.float32)
    else:
        if not is_decoder_only(config):
            config.is_decoder = True
        lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if text_cfg.gradient_checkpointing:
        if not getattr(lm, "supports_gradient_checkpointing", False):
            raise ValueError(f"model.lm.gradient_checkpointing: {type(lm).__name__} does not support it")
        lm.config.use_cache = False
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return lm


def build_report_model(cfg, image_size: int, lm_config=None, load_weights: bool = True,
                       init_state: Optional[dict] = None) -> ReportGenerator:
    """The :class:`ReportGenerator` of a ``ReportModelConfig``.

    ``lm_config``: build the LM from this transformers config (a bundle's) instead of loading it;
    ``init_state``: tensors copied in by name before freezing and LoRA (``init_from``: a stage-1
    model's vision encoder, or an earlier report model's connector and LM). Then the freezing
    policies apply (``vision.trainable_layers``, ``lm.trainable_layers``) and, with ``lm.lora.r > 0``,
    LoRA adapters wrap the frozen LM.
    """
    from medfuse_core.models.text import add_lora, apply_trainable_layers
    from medfuse_core.models.vision import build_vision_encoder

    vision = build_vision_encoder(cfg.vision, image_size, load_weights=load_weights)
    lm = load_causal_lm(cfg.lm, lm_config)
    c = cfg.connector
    guide = cfg.guidance.labels if cfg.guidance.enabled else ()
    model = ReportGenerator(vision, lm, c.name, guide_labels=guide, num_queries=c.num_queries, heads=c.heads)
    if init_state:
        own = model.state_dict()
        mismatched = [k for k, v in init_state.items() if k.startswith("guide_head.") and
                      (k not in own or own[k].shape != v.shape)]
        if mismatched:
            raise ValueError("init_from: its guidance head scores other labels than model.guidance.labels; "
                             "set model.guidance.labels to the same names")
        model.load_state_dict(init_state, strict=False)
    if cfg.lm.lora.enabled:
        lm.requires_grad_(False)
        model.lm = add_lora(lm, cfg.lm.lora)
    else:
        apply_trainable_layers(lm, cfg.lm.trainable_layers)
    return model
