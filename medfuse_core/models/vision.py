"""Vision encoders: images ``[B, C, H, W]`` -> tokens ``[B, N, out_dim]``.

Every encoder in :data:`VISION_ENCODERS` is built as
``factory(in_channels=..., image_size=..., weights_path=...)`` and returns a
:class:`VisionEncoder`. CNNs return their last feature map flattened row-major
(``N = h * w``); ViTs return their patch tokens (the class token is dropped).

Weights are never downloaded: ``weights_path`` names a local state-dict file in
torchvision's layout (``.pt``/``.pth`` read with ``torch.load(weights_only=True)``,
or ``.safetensors``). The classifier (``fc.*`` / ``heads.*``) is dropped, a 3-channel
stem is folded into the configured channel count, and ViT position embeddings are
resized to the configured image size.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet as tv_resnet
from torchvision.models.vision_transformer import VisionTransformer

from medfuse_core.config import VisionConfig
from medfuse_core.registry import Registry

VISION_ENCODERS: Registry["VisionEncoder"] = Registry("vision encoder")


class VisionEncoder(nn.Module):
    """Base class: ``forward(images) -> tokens [B, N, out_dim]``.

    ``has_positions`` tells whether the tokens already carry position information
    (ViT) or whether the caller should add its own (CNN feature maps).
    """

    out_dim: int
    has_positions: bool = False

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Token grid ``(rows, cols)`` produced for an input of ``height x width`` pixels."""
        raise NotImplementedError

    def load_weights(self, path: str | Path) -> None:
        """Load a local torchvision-format state dict (see module docstring)."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The encoder's stages, input to output (what ``trainable_layers`` counts from the top)."""
        raise NotImplementedError

    def set_trainable_layers(self, k: int) -> None:
        """``-1``: everything trains; ``0``: frozen; ``k > 0``: only the top ``k`` blocks (and any
        parameter after them, e.g. a ViT's final norm) train."""
        if k < -1:
            raise ValueError(f"trainable_layers must be >= -1, got {k}")
        self.requires_grad_(k == -1)
        if k > 0:
            blocks = self.blocks()
            top = {id(p) for b in blocks[-k:] for p in b.parameters()}
            below = {id(p) for b in blocks[:-k] for p in b.parameters()}
            stem_seen = False
            for p in self.parameters():
                if id(p) in top:
                    p.requires_grad_(True)
                    stem_seen = True
                elif stem_seen and id(p) not in below:
                    p.requires_grad_(True)


# --------------------------------------------------------------------------- helpers


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a weights-only ``torch.load`` file.

    A ``{"state_dict": ...}`` / ``{"model": ...}`` wrapper and a ``module.`` (DDP)
    prefix are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vision weights file {str(path)!r} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a mapping of parameter names to tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return dict(state)


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Fold a stem kernel ``[O, C, k, k]`` to ``in_channels`` input channels.

    The checkpoint's input channels are summed and spread evenly, so a grey image
    replicated over the original channels gives the same response. For
    ``in_channels == 1`` this is exactly the sum over the channel dim.
    """
    if weight.shape[1] == in_channels:
        return weight
    summed = weight.sum(dim=1, keepdim=True)
    return (summed / in_channels).repeat(1, in_channels, 1, 1).contiguous()


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path}: weights do not fit the encoder; missing {result.missing_keys[:8]}, "
            f"unexpected {result.unexpected_keys[:8]}"
        )


# --------------------------------------------------------------------------- ResNet


class ResNetEncoder(VisionEncoder):
    """A torchvision ResNet without pooling/classifier; tokens = flattened last feature map."""

    has_positions = False

    def __init__(self, depth: int, in_channels: int = 1, weights_path: Optional[str] = None):
        super().__init__()
        builders = {18: tv_resnet.resnet18, 34: tv_resnet.resnet34, 50: tv_resnet.resnet50}
        if depth not in builders:
            raise ValueError(f"unsupported ResNet depth {depth}; choose one of {sorted(builders)}")
        net = builders[depth](weights=None)
        if in_channels != 3:
            # PyTorch's default Conv2d init (kaiming-uniform, fan-in), not torchvision's fan-out
            # normal: for a 1-channel stem fan-out gives weights ~3x smaller, so each Adam step
            # moves the stem ~3x further relative to its scale (BN follows, so only that ratio
            # matters). Measured from scratch on the independent corpus's tuning split: +0.02
            # macro AUROC, two seeds out of two (docs/performance.md, time to quality, "Fifth session")
            net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.out_dim = net.fc.in_features
        net.fc = nn.Identity()
        net.avgpool = nn.Identity()
        self.backbone = net
        self.in_channels = in_channels
        if weights_path:
            self.load_weights(weights_path)

    def load_weights(self, path: str | Path) -> None:
        """Load a torchvision ResNet state dict; ``fc.*`` is dropped, ``conv1`` is channel-folded."""
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
        if "conv1.weight" in state:
            w = state["conv1.weight"]
            if w.shape[1] != self.in_channels:
                if w.shape[1] != 3:
                    raise ValueError(f"{path}: conv1 has {w.shape[1]} input channels; cannot adapt to {self.in_channels}")
                state["conv1.weight"] = adapt_input_channels(w, self.in_channels)
        _load_strict(self.backbone, state, path)

    def blocks(self) -> list[nn.Module]:
        """Stem (conv1 + bn1), layer1 ... layer4."""
        n = self.backbone
        return [nn.ModuleList([n.conv1, n.bn1]), n.layer1, n.layer2, n.layer3, n.layer4]

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Five stride-2 stages with 'same'-style padding: ``ceil(size / 32)``."""
        return math.ceil(height / 32), math.ceil(width / 32)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, ceil(H/32) * ceil(W/32), out_dim]``."""
        n = self.backbone
        x = n.maxpool(n.relu(n.bn1(n.conv1(images))))
        x = n.layer4(n.layer3(n.layer2(n.layer1(x))))
        return x.flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------- ViT


class ViTEncoder(VisionEncoder):
    """A torchvision VisionTransformer built for ``image_size``; tokens = patch tokens.

    If ``image_size`` is not a multiple of ``patch_size`` the model is built for the
    next multiple and inputs are zero-padded on the bottom/right.
    """

    has_positions = True

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        num_layers: int,
        num_heads: int,
        hidden_dim: int,
        mlp_dim: int,
        in_channels: int = 1,
        weights_path: Optional[str] = None,
    ):
        super().__init__()
        self.image_size = image_size
        self.patch_size = patch_size
        self.padded_size = math.ceil(image_size / patch_size) * patch_size
        vit = VisionTransformer(
            image_size=self.padded_size,
            patch_size=patch_size,
            num_layers=num_layers,
            num_heads=num_heads,
            hidden_dim=hidden_dim,
            mlp_dim=mlp_dim,
        )
        if in_channels != 3:
            vit.conv_proj = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
            fan_in = in_channels * patch_size * patch_size
            nn.init.trunc_normal_(vit.conv_proj.weight, std=math.sqrt(1.0 / fan_in))
            nn.init.zeros_(vit.conv_proj.bias)
        vit.heads = nn.Identity()
        self.vit = vit
        self.in_channels = in_channels
        self.out_dim = hidden_dim
        if weights_path:
            self.load_weights(weights_path)

    def load_weights(self, path: str | Path) -> None:
        """Load a torchvision ViT state dict; ``heads.*`` dropped, stem channel-folded, positions resized."""
        state = {k: v for k, v in read_state_dict(path).items() if not k.startswith("heads.")}
        w = state.get("conv_proj.weight")
        if w is not None and w.shape[1] != self.in_channels:
            if w.shape[1] != 3:
                raise ValueError(f"{path}: conv_proj has {w.shape[1]} input channels; cannot adapt to {self.in_channels}")
            state["conv_proj.weight"] = adapt_input_channels(w, self.in_channels)
        pos = state.get("encoder.pos_embedding")
        target = self.vit.encoder.pos_embedding
        if pos is not None and pos.shape != target.shape and pos.shape[-1] == target.shape[-1]:
            state["encoder.pos_embedding"] = _resize_pos_embedding(pos, target.shape[1] - 1)
        _load_strict(self.vit, state, path)

    def blocks(self) -> list[nn.Module]:
        """Patch embedding (with class token and positions), then each encoder block."""
        v = self.vit
        stem = nn.ModuleList([v.conv_proj])
        stem.register_parameter("class_token", v.class_token)
        stem.register_parameter("pos_embedding", v.encoder.pos_embedding)
        return [stem, *v.encoder.layers]

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid ``(rows, cols)``."""
        return math.ceil(height / self.patch_size), math.ceil(width / self.patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` (S = image_size) -> patch tokens ``[B, (S/patch)^2, out_dim]``."""
        h, w = images.shape[-2:]
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"this ViT was built for {self.image_size}x{self.image_size} images, got {h}x{w}")
        if self.padded_size != self.image_size:
            pad = self.padded_size - self.image_size
            images = F.pad(images, (0, pad, 0, pad))
        x = self.vit.conv_proj(images).flatten(2).transpose(1, 2)
        cls = self.vit.class_token.expand(x.shape[0], -1, -1)
        x = self.vit.encoder(torch.cat([cls, x], dim=1))
        return x[:, 1:]


def _resize_pos_embedding(pos: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Bicubically resize ``[1, 1 + n*n, D]`` ViT position embeddings to ``num_patches`` patches."""
    cls, grid = pos[:, :1], pos[:, 1:]
    old = int(round(math.sqrt(grid.shape[1])))
    new = int(round(math.sqrt(num_patches)))
    if old * old != grid.shape[1] or new * new != num_patches:
        raise ValueError("can only resize square position-embedding grids")
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    return torch.cat([cls, grid], dim=1)


# --------------------------------------------------------------------------- registry


@VISION_ENCODERS.register("resnet18")
def resnet18(in_channels: int = 1, image_size: int = 224, weights_path: Optional[str] = None) -> ResNetEncoder:
    """ResNet-18 (512-d tokens). ``image_size`` is accepted for a uniform signature."""
    return ResNetEncoder(18, in_channels=in_channels, weights_path=weights_path)


@VISION_ENCODERS.register("resnet34")
def resnet34(in_channels: int = 1, image_size: int = 224, weights_path: Optional[str] = None) -> ResNetEncoder:
    """ResNet-34 (512-d tokens)."""
    return ResNetEncoder(34, in_channels=in_channels, weights_path=weights_path)


@VISION_ENCODERS.register("resnet50")
def resnet50(in_channels: int = 1, image_size: int = 224, weights_path: Optional[str] = None) -> ResNetEncoder:
    """ResNet-50 (2048-d tokens)."""
    return ResNetEncoder(50, in_channels=in_channels, weights_path=weights_path)


@VISION_ENCODERS.register("vit_tiny")
def vit_tiny(
    in_channels: int = 1,
    image_size: int = 224,
    weights_path: Optional[str] = None,
    patch_size: int = 16,
    num_layers: int = 12,
    num_heads: int = 3,
    hidden_dim: int = 192,
    mlp_dim: int = 768,
) -> ViTEncoder:
    """DeiT-Tiny-sized ViT (192-d tokens, patch 16 by default) built for ``image_size``."""
    return ViTEncoder(image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim, in_channels, weights_path)


@VISION_ENCODERS.register("vit_b_16")
def vit_b_16(in_channels: int = 1, image_size: int = 224, weights_path: Optional[str] = None) -> ViTEncoder:
    """ViT-B/16 (768-d tokens) built for ``image_size``; accepts torchvision ``vit_b_16`` weights."""
    return ViTEncoder(image_size, 16, 12, 12, 768, 3072, in_channels, weights_path)


def build_vision_encoder(cfg: VisionConfig, image_size: int, load_weights: bool = True) -> VisionEncoder:
    """Build the configured encoder; ``load_weights=False`` ignores ``cfg.weights_path``."""
    factory = VISION_ENCODERS.get(cfg.name)
    weights = cfg.weights_path if load_weights else None
    encoder = factory(in_channels=cfg.in_channels, image_size=image_size, weights_path=weights)
    if getattr(cfg, "trainable_layers", -1) != -1:
        encoder.set_trainable_layers(cfg.trainable_layers)
    return encoder
