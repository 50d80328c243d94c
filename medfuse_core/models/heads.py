"""Multi-label classification heads: ``[B, in_dim]`` -> logits ``[B, num_labels]``."""

from __future__ import annotations

from torch import nn

from medfuse_core.config import HeadConfig
from medfuse_core.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")


@HEADS.register("linear")
def linear_head(in_dim: int, num_labels: int, hidden: int = 0, dropout: float = 0.0) -> nn.Module:
    """Dropout -> Linear. ``hidden`` is ignored."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, num_labels))


@HEADS.register("mlp")
def mlp_head(in_dim: int, num_labels: int, hidden: int = 256, dropout: float = 0.0) -> nn.Module:
    """Linear -> GELU -> Dropout -> Linear with ``hidden`` units."""
    if hidden <= 0:
        raise ValueError("an mlp head needs hidden > 0")
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, num_labels))


def head_name(cfg: HeadConfig) -> str:
    """Registry name for a head config: ``mlp`` when ``hidden > 0``, else ``linear``."""
    return "mlp" if cfg.hidden > 0 else "linear"


def build_head(cfg: HeadConfig, in_dim: int, num_labels: int) -> nn.Module:
    """Instantiate the head described by ``cfg``."""
    return HEADS.get(head_name(cfg))(in_dim=in_dim, num_labels=num_labels, hidden=cfg.hidden, dropout=cfg.dropout)
