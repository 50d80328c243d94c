"""Zero-shot CheXpert classification from image/prompt embeddings (CLIP-style), pure NumPy.

Prompts live in a user-editable YAML file (the repository ships
``experiments/prompts/cxr_zero_shot.yaml``)::

    version: 1
    labels:
      Pleural Effusion:
        positive: ["There is a pleural effusion.", ...]
        negative: ["No pleural effusion.", ...]

:func:`load_prompts` validates it; the caller embeds the prompts with its text encoder (see
:func:`prompt_embeddings`); :func:`zero_shot_scores` turns image and prompt embeddings into a
probability per label; :func:`zero_shot_metrics` scores them against 0/1/NaN targets.

The prompt file is not part of the ``medfuse_core`` package, so every function takes its path;
:func:`default_prompts_path` finds the repository's copy in a source checkout only.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import yaml
from sklearn.metrics import roc_auc_score

from medfuse_core.data.labels import CHEXPERT_LABELS


__all__ = [
    "PromptError",
    "PROMPT_FILE_VERSION",
    "PROMPTS_RELATIVE_PATH",
    "default_prompts_path",
    "load_prompts",
    "prompt_embeddings",
    "zero_shot_scores",
    "zero_shot_metrics",
]

PROMPT_FILE_VERSION = 1
#: Where the shipped prompt file lies, relative to the repository root.
PROMPTS_RELATIVE_PATH = Path("experiments") / "prompts" / "cxr_zero_shot.yaml"
_KINDS = ("positive", "negative")


class PromptError(ValueError):
    """A prompt file that cannot be used; the message names the file and the label/key."""


# --------------------------------------------------------------------------- prompt file


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping (YAML would keep the last)."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    loader.flatten_mapping(node)
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # unhashable key; let the default constructor report it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def default_prompts_path() -> Path:
    """``<repo>/experiments/prompts/cxr_zero_shot.yaml`` of the source checkout holding this package.

    Resolved relative to the directory that contains the ``medfuse_core`` package. An installed
    wheel does not carry ``experiments/``: there this raises :class:`PromptError`, and the caller
    must pass the prompt file's path explicitly.
    """
    here = Path(__file__).resolve()
    package_root = next((p for p in here.parents if p.name == "medfuse_core"), here.parents[1])
    path = package_root.parent / PROMPTS_RELATIVE_PATH
    if not path.is_file():
        raise PromptError(f"{path}: default prompt file not found (medfuse_core is not in a source "
                          "checkout, e.g. an installed wheel); pass the prompt file's path explicitly")
    return path


def load_prompts(path: str | Path) -> dict[str, dict[str, list[str]]]:
    """Read and validate a zero-shot prompt file.

    Layout: ``version: 1`` and ``labels: {<CheXpert label>: {positive: [...], negative: [...]}}``.
    Labels must be spelled as in ``CHEXPERT_LABELS``; a file may cover a subset of them. Each
    list must hold at least one non-empty string.

    Returns:
        ``{label: {"positive": [...], "negative": [...]}}`` in file order (prompts stripped).

    Raises:
        PromptError: missing/unreadable file, malformed YAML, wrong layout or version, unknown
            label, unknown key, empty list or blank prompt; the message names the file and the
            offending label/key.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: cannot read prompt file ({type(exc).__name__}: {exc})") from exc
    try:
        doc = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise PromptError(f"{path}: malformed YAML: {exc}") from exc

    if not isinstance(doc, dict):
        raise PromptError(f"{path}: expected a mapping with keys 'version' and 'labels', "
                          f"got {type(doc).__name__}")
    unknown_top = sorted(str(k) for k in doc if k not in ("version", "labels"))
    if unknown_top:
        raise PromptError(f"{path}: unknown top-level key(s) {unknown_top}; expected 'version' and 'labels'")
    if "version" not in doc:
        raise PromptError(f"{path}: missing 'version' (expected version: {PROMPT_FILE_VERSION})")
    if doc["version"] != PROMPT_FILE_VERSION or isinstance(doc["version"], bool):
        raise PromptError(f"{path}: version: unsupported value {doc['version']!r} "
                          f"(expected {PROMPT_FILE_VERSION})")
    labels = doc.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise PromptError(f"{path}: 'labels' must be a non-empty mapping of CheXpert label -> "
                          "{positive: [...], negative: [...]}")

    out: dict[str, dict[str, list[str]]] = {}
    for label, entry in labels.items():
        if label not in CHEXPERT_LABELS:
            close = difflib.get_close_matches(str(label), CHEXPERT_LABELS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise PromptError(f"{path}: labels: unknown label {label!r}{hint}; known: {list(CHEXPERT_LABELS)}")
        if not isinstance(entry, dict):
            raise PromptError(f"{path}: labels.{label}: expected a mapping with 'positive' and 'negative' lists, "
                              f"got {type(entry).__name__}")
        extra = sorted(str(k) for k in entry if k not in _KINDS)
        if extra:
            raise PromptError(f"{path}: labels.{label}: unknown key(s) {extra}; expected 'positive' and 'negative'")
        prompts: dict[str, list[str]] = {}
        for kind in _KINDS:
            where = f"{path}: labels.{label}.{kind}"
            if kind not in entry:
                raise PromptError(f"{where}: missing (a list of at least one prompt)")
            items = entry[kind]
            if not isinstance(items, list):
                raise PromptError(f"{where}: expected a list of prompts, got {type(items).__name__}")
            if not items:
                raise PromptError(f"{where}: empty list (give at least one prompt)")
            cleaned = []
            for i, item in enumerate(items):
                if not isinstance(item, str) or not item.strip():
                    raise PromptError(f"{where}[{i}]: expected a non-empty string, got {item!r}")
                cleaned.append(item.strip())
            prompts[kind] = cleaned
        out[label] = prompts
    return out


def prompt_embeddings(prompts: Mapping[str, Mapping[str, Sequence[str]]],
                      encode: Callable[[list[str]], np.ndarray]
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Embed every label's prompts with ``encode`` (list of texts -> ``[P, D]``).

    Returns ``(pos_emb, neg_emb)``, each ``label -> [P, D]``, ready for :func:`zero_shot_scores`.
    """
    pos: dict[str, np.ndarray] = {}
    neg: dict[str, np.ndarray] = {}
    for label, entry in prompts.items():
        for kind, target in (("positive", pos), ("negative", neg)):
            texts = list(entry[kind])
            emb = np.asarray(encode(texts))
            if emb.ndim != 2 or emb.shape[0] != len(texts):
                raise ValueError(f"encode returned shape {emb.shape} for {len(texts)} {kind} prompt(s) "
                                 f"of {label!r}; expected [{len(texts)}, D]")
            target[label] = emb
    return pos, neg


# --------------------------------------------------------------------------- scoring


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what} contains non-finite values")
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    if np.any(norms == 0):
        raise ValueError(f"{what} has an all-zero row; cosine similarity is undefined")
    return x / norms


def _class_embedding(prompt_emb: np.ndarray, what: str, dim: int) -> np.ndarray:
    """CLIP prompt ensembling: normalise each prompt, average, normalise again."""
    e = np.asarray(prompt_emb, dtype=np.float64)
    if e.ndim == 1:
        e = e[None, :]
    if e.ndim != 2 or e.shape[0] == 0:
        raise ValueError(f"{what} must be [P, D] with P >= 1, got shape {e.shape}")
    if e.shape[1] != dim:
        raise ValueError(f"{what} has dimension {e.shape[1]}, image embeddings have {dim}")
    mean = _unit_rows(e, what).mean(axis=0)
    norm = np.linalg.norm(mean)
    if norm < 1e-12:
        raise ValueError(f"{what}: the prompt embeddings cancel out (their mean is ~0)")
    return mean / norm


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # stable for any magnitude


def zero_shot_scores(image_emb: np.ndarray, pos_emb: Mapping[str, np.ndarray],
                     neg_emb: Mapping[str, np.ndarray], scale: float = 1.0) -> dict[str, np.ndarray]:
    """Per-label probability that each image shows the finding, from prompt embeddings.

    Per label, the positive prompts' embeddings (``[P, D]``) are L2-normalised, averaged and
    re-normalised into one positive class embedding, likewise the negative ones (CLIP prompt
    ensembling). The image's score is the softmax probability of the positive class over
    {positive, negative} with logits ``scale * cos``, i.e. ``sigmoid(scale * (cos_pos - cos_neg))``.

    Args:
        image_emb: ``[N, D]`` image embeddings (any scale; normalised here).
        pos_emb, neg_emb: ``label -> [P, D]`` prompt embeddings; both must name the same labels.
        scale: the logit scale (temperature inverse), e.g. the contrastive model's learnt one.

    Returns:
        ``label -> [N]`` float64 probabilities, in ``pos_emb``'s label order.
    """
    images = np.asarray(image_emb, dtype=np.float64)
    if images.ndim != 2:
        raise ValueError(f"image_emb must be a 2-D array [N, D], got {images.ndim} dimension(s)")
    images = _unit_rows(images, "image_emb")
    scale = float(scale)
    if not np.isfinite(scale):
        raise ValueError("scale must be finite")
    missing_neg = [label for label in pos_emb if label not in neg_emb]
    missing_pos = [label for label in neg_emb if label not in pos_emb]
    if missing_neg or missing_pos:
        raise ValueError(f"pos_emb and neg_emb must name the same labels; without negative prompts: "
                         f"{missing_neg}, without positive prompts: {missing_pos}")
    dim = images.shape[1]
    scores: dict[str, np.ndarray] = {}
    for label in pos_emb:
        pos = _class_embedding(pos_emb[label], f"positive prompt embeddings of {label!r}", dim)
        neg = _class_embedding(neg_emb[label], f"negative prompt embeddings of {label!r}", dim)
        scores[label] = _sigmoid(scale * (images @ pos - images @ neg))
    return scores


def zero_shot_metrics(scores: Mapping[str, np.ndarray], labels: np.ndarray, label_names: Sequence[str]) -> dict:
    """AUROC of zero-shot scores per label, against 0/1/NaN targets (NaN = not scored).

    Args:
        scores: ``label -> [N]`` from :func:`zero_shot_scores`.
        labels: ``[N, L]`` targets, column ``j`` for ``label_names[j]``.
        label_names: the names of ``labels``' columns.

    A label is scored on its non-NaN targets when both classes occur there. Labels that do
    not (and labels without scores) are left out of ``auroc`` and listed in ``skipped``.

    Returns:
        ``{"auroc": {label: ..}, "auroc_macro": mean over scored labels (NaN if none),
        "n": {label: non-NaN target count}, "skipped": [label, ...]}``.
    """
    targets = np.asarray(labels, dtype=np.float64)
    names = list(label_names)
    if targets.ndim != 2 or targets.shape[1] != len(names):
        raise ValueError(f"labels must be [N, {len(names)}] (one column per label name), got shape {targets.shape}")
    if len(set(names)) != len(names):
        raise ValueError("label_names contains duplicates")
    unknown = [label for label in scores if label not in names]
    if unknown:
        raise ValueError(f"scores for label(s) {unknown} that have no target column in label_names")
    bad = ~np.isnan(targets) & (targets != 0) & (targets != 1)
    if bad.any():
        raise ValueError("targets must be 0, 1 or NaN (map uncertain labels with the label policies first)")

    auroc: dict[str, float] = {}
    counts: dict[str, int] = {}
    skipped: list[str] = []
    for j, name in enumerate(names):
        valid = ~np.isnan(targets[:, j])
        counts[name] = int(valid.sum())
        if name not in scores:
            skipped.append(name)
            continue
        s = np.asarray(scores[name], dtype=np.float64).reshape(-1)
        if s.shape[0] != targets.shape[0]:
            raise ValueError(f"scores[{name!r}] has {s.shape[0]} entries, labels has {targets.shape[0]} rows")
        if not np.all(np.isfinite(s[valid])):
            raise ValueError(f"scores[{name!r}] contains non-finite values")
        y = targets[valid, j]
        n_pos = int(y.sum())
        if 0 < n_pos < y.size:
            auroc[name] = float(roc_auc_score(y, s[valid]))
        else:
            skipped.append(name)
    return {
        "auroc": auroc,
        "auroc_macro": float(np.mean(list(auroc.values()))) if auroc else float("nan"),
        "n": counts,
        "skipped": skipped,
    }
