"""Self-contained, offline model bundles.

A bundle directory holds::

    model.safetensors     full model state dict (no pickle)
    medfuse_model.json    kind ("diagnosis", "contrastive" or "report"), model config, label names
                          (none for a stage-1 or report model), image size, extra (e.g. thresholds)
    text_encoder/         tokenizer files + the transformers config of the text encoder, or of a
                          report model's LM (absent for an image-only model)

Loading rebuilds the text encoder skeleton with ``AutoModel.from_config`` from
``text_encoder/`` (the original ``name_or_path`` is not needed), ignores the vision
``weights_path``, and then loads every weight from ``model.safetensors``. An image-only
bundle loads with ``tokenizer=None``. The format version did not change for image-only
bundles: a bundle with ``text_encoder/`` loads as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from torch import nn

from medfuse_core.config import ModelConfig, PretrainModelConfig, ReportModelConfig
from medfuse_core.models.contrastive import ContrastiveModel, build_contrastive_model
from medfuse_core.models.diagnosis import DiagnosisModel, build_model
from medfuse_core.models.report import ReportGenerator, build_report_model
from medfuse_core.models.text import load_tokenizer

KINDS = {DiagnosisModel: "diagnosis", ContrastiveModel: "contrastive", ReportGenerator: "report"}
MODEL_CONFIGS = {"diagnosis": ModelConfig, "contrastive": PretrainModelConfig, "report": ReportModelConfig}

WEIGHTS_FILE = "model.safetensors"
META_FILE = "medfuse_model.json"
TEXT_DIR = "text_encoder"
FORMAT_VERSION = 1


@dataclass
class LoadedBundle:
    """What :func:`load_bundle` returns; ``model`` is in eval mode; ``tokenizer`` is None for an
    image-only model."""

    model: DiagnosisModel | ContrastiveModel | ReportGenerator
    model_config: ModelConfig | PretrainModelConfig | ReportModelConfig
    label_names: list[str]
    image_size: int
    tokenizer: Any
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "diagnosis"


def _unwrap(model: nn.Module) -> DiagnosisModel | ContrastiveModel | ReportGenerator:
    # DDP / DeepSpeed engines keep the real model under ``.module``
    kinds = tuple(KINDS)
    while not isinstance(model, kinds) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    if not isinstance(model, kinds):
        raise TypeError(f"expected a DiagnosisModel, ContrastiveModel or ReportGenerator, got {type(model).__name__}")
    return model


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays/scalars, tensors
        return value.tolist()
    raise TypeError(f"bundle extra: {type(value).__name__} is not JSON serialisable")


def save_bundle(
    model: nn.Module,
    cfg: ModelConfig,
    label_names: Sequence[str],
    image_size: int,
    out_dir: str | Path,
    extra: Optional[dict[str, Any]] = None,
    tokenizer: Any = None,
    state_dict: Optional[dict] = None,
) -> Path:
    """Write a bundle to ``out_dir`` (created if needed) and return its path.

    ``tokenizer`` defaults to ``load_tokenizer(cfg.text.name_or_path)`` (none is written for a
    model without a text encoder); ``extra`` must be
    JSON-serialisable (numpy values are converted with ``tolist``). ``state_dict`` replaces the
    model's own weights, e.g. the consolidated weights of a ZeRO-3 sharded model.
    """
    from safetensors.torch import save_file, save_model

    model = _unwrap(model)
    label_names = [str(name) for name in label_names]
    if len(label_names) != model.num_labels:
        raise ValueError(f"{len(label_names)} label names for a model with {model.num_labels} outputs")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_model = model.lm if isinstance(model, ReportGenerator) else model.text_encoder
    if text_model is not None:
        text_dir = out / TEXT_DIR
        text_dir.mkdir(exist_ok=True)
        if tokenizer is None:
            tokenizer = load_tokenizer((cfg.lm if isinstance(model, ReportGenerator) else cfg.text).name_or_path)
        tokenizer.save_pretrained(str(text_dir))
        text_model.config.save_pretrained(str(text_dir))
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": KINDS[type(model)],
        "model_config": cfg.model_dump(mode="json"),
        "label_names": label_names,
        "image_size": int(image_size),
        "extra": extra or {},
    }
    # serialise first so a bad ``extra`` fails before anything half-written is left behind
    text = json.dumps(meta, indent=2, default=_json_default)
    if state_dict is None:
        save_model(model, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    else:
        weights = {k: v.detach().float().contiguous().clone() if v.is_floating_point() else v.detach().contiguous().clone()
                   for k, v in state_dict.items()}
        save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / META_FILE).write_text(text + "\n")
    return out


def read_bundle_meta(bundle_dir: str | Path) -> dict:
    """The bundle's ``medfuse_model.json`` (label names, image size, config, extra) without loading weights."""
    meta_path = Path(bundle_dir) / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{Path(bundle_dir).name}: not a medfuse bundle ({META_FILE} missing)")
    return json.loads(meta_path.read_text())


def load_weights_strict(model: nn.Module, path: str, device: str = "cpu") -> None:
    """Load a safetensors state dict into ``model``: every tensor must fit, none may be left out,
    except that tied parameters (an LM head sharing its embeddings) may be stored under one name
    or under all of theirs."""
    from safetensors.torch import load_file

    state = load_file(path, device=device)
    result = model.load_state_dict(state, strict=False)
    names_by_storage: dict[int, list[str]] = {}
    for name, tensor in model.state_dict().items():
        names_by_storage.setdefault(tensor.data_ptr(), []).append(name)
    tied = {n for names in names_by_storage.values() if len(names) > 1 and any(k in state for k in names)
            for n in names}
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"{Path(path).parent.name}: the weights do not fit the model "
                           f"({len(missing)} missing, {len(result.unexpected_keys)} unexpected tensors, e.g. "
                           f"{(missing + list(result.unexpected_keys))[0]})")


def load_bundle(bundle_dir: str | Path, device: str = "cpu") -> LoadedBundle:
    """Rebuild the model from a bundle (weights-only, offline) and return it in eval mode."""
    from transformers import AutoConfig, AutoTokenizer

    root = Path(bundle_dir)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root}: not a medfuse bundle ({META_FILE} missing)")
    meta = json.loads(meta_path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{root}: unsupported bundle format {meta.get('format_version')!r}")
    kind = meta.get("kind", "diagnosis")  # bundles from before stage 1 are diagnosis models
    cfg = MODEL_CONFIGS[kind].model_validate(meta["model_config"])
    labels = list(meta["label_names"])
    image_size = int(meta["image_size"])
    text_config = tokenizer = None
    if (cfg.lm if kind == "report" else cfg.text).enabled:
        text_dir = str(root / TEXT_DIR)
        text_config = AutoConfig.from_pretrained(text_dir)
        tokenizer = AutoTokenizer.from_pretrained(text_dir)
    if kind == "report":
        model = build_report_model(cfg, image_size, lm_config=text_config, load_weights=False)
    elif kind == "contrastive":
        model = build_contrastive_model(cfg, image_size, meta.get("extra", {}).get("objective", "infonce"),
                                        text_config=text_config, load_vision_weights=False)
    else:
        model = build_model(cfg, len(labels), image_size, text_config=text_config, load_vision_weights=False)
    load_weights_strict(model, str(root / WEIGHTS_FILE), device)
    model.to(device).eval()
    return LoadedBundle(model, cfg, labels, image_size, tokenizer, dict(meta.get("extra") or {}), kind)


def load_encoder_weights(model: nn.Module, bundle_dir: str) -> int:
    """Copy the vision and text encoder weights of a (stage-1) bundle into ``model`` by name;
    returns how many tensors were copied. Every encoder tensor of the bundle must match."""
    from safetensors.torch import load_file

    from medfuse_core.models.contrastive import encoder_state

    source = encoder_state(load_file(str(Path(bundle_dir) / WEIGHTS_FILE)))
    own = model.state_dict()
    bad = [k for k, v in source.items() if k not in own or own[k].shape != v.shape]
    if bad or not source:
        raise RuntimeError(f"init_from: {len(bad)} of {len(source)} encoder tensors do not fit this model "
                           "(another vision encoder or text encoder); pretrain with the same model.vision "
                           "and model.text settings")
    missing = [k for k in own if k.startswith(("vision_encoder.", "text_encoder.")) and k not in source]
    if missing:
        raise RuntimeError(f"init_from: the pretrained model lacks {len(missing)} encoder tensors this model has")
    model.load_state_dict(source, strict=False)
    return len(source)


def update_bundle_extra(bundle_dir: str | Path, updates: dict[str, Any]) -> dict:
    """Set keys of a bundle's ``extra`` (e.g. fitted temperatures and thresholds) in place; returns it."""
    path = Path(bundle_dir) / META_FILE
    meta = read_bundle_meta(bundle_dir)
    meta["extra"] = {**(meta.get("extra") or {}), **updates}
    tmp = path.with_name(f".{META_FILE}.tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=_json_default) + "\n")
    tmp.replace(path)
    return meta["extra"]
