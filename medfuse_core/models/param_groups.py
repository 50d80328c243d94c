"""Optimizer parameter groups shared by every model."""

from __future__ import annotations

from typing import Any, Iterable

from torch import nn


def optimizer_groups(module: nn.Module, lr: float, text_lr: float, weight_decay: float,
                     no_decay_names: Iterable[str] = (),
                     text_prefixes: tuple[str, ...] = ("text_encoder.",)) -> list[dict[str, Any]]:
    """Groups over the trainable parameters: the pretrained text model (names starting with
    ``text_prefixes``, default ``text_encoder.*``) at ``text_lr``, everything else at ``lr``; biases, norm weights and other parameters with
    ``ndim <= 1``, and leaves named in ``no_decay_names``, without weight decay. Empty groups
    are left out; each group has a ``name`` for logging."""
    names = frozenset(no_decay_names)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        is_text = name.startswith(text_prefixes)
        no_decay = param.ndim <= 1 or name.rsplit(".", 1)[-1] in names
        buckets.setdefault((is_text, no_decay), []).append(param)
    return [{"name": f"{'text' if t else 'main'}{'_no_decay' if nd else ''}", "params": params,
             "lr": text_lr if t else lr, "weight_decay": 0.0 if nd else weight_decay}
            for (t, nd), params in sorted(buckets.items())]
