"""Model building blocks: vision/text encoders, fusion modules, heads, the diagnosis model, bundles."""

from medfuse_core.models.bundle import LoadedBundle, load_bundle, save_bundle
from medfuse_core.models.diagnosis import DiagnosisModel, build_model
from medfuse_core.models.fusion import FUSION_MODULES, FusionOutput, build_fusion
from medfuse_core.models.heads import HEADS, build_head
from medfuse_core.models.text import TextEncoder, load_tokenizer, resolve_text_model
from medfuse_core.models.vision import VISION_ENCODERS, VisionEncoder, build_vision_encoder

__all__ = [
    "DiagnosisModel",
    "FUSION_MODULES",
    "FusionOutput",
    "HEADS",
    "LoadedBundle",
    "TextEncoder",
    "VISION_ENCODERS",
    "VisionEncoder",
    "build_fusion",
    "build_head",
    "build_model",
    "build_vision_encoder",
    "load_bundle",
    "load_tokenizer",
    "resolve_text_model",
    "save_bundle",
]
