"""A rule-based radiology report labeler for the 14 CheXpert findings, and clinical-efficacy F1.

In the tradition of NegEx and the CheXpert labeler: each finding has mention phrases; each
mention is classified by the cues around it in its clause: a negation cue before it ("no",
"without", "negative for", "resolved") or after it ("is not seen", "has resolved") makes it
negative, an uncertainty cue ("may", "possible", "cannot be excluded", "versus", "concern for")
makes it uncertain, otherwise it is positive. A finding's label over a report is the strongest
of its mentions: positive over uncertain over negative; unmentioned findings are blank (None).
"No Finding" is positive when no finding other than support devices is positive or uncertain.

None of the published neural labelers (CheXbert, RadGraph) can download weights offline; a
neural labeler with weights on local disk plugs in through :data:`LABELERS`.
"""

from __future__ import annotations

import re
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.registry import Registry

COMPETITION_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")

POSITIVE, NEGATIVE, UNCERTAIN = 1.0, 0.0, -1.0

# mention phrases (regular expressions over lower-cased text, word-bounded)
MENTIONS: dict[str, tuple[str, ...]] = {
    "Atelectasis": (r"atelecta\w*", r"collapse[sd]?", r"volume loss"),
    "Cardiomegaly": (r"cardiomegaly", r"(?:heart|cardiac)(?: size| silhouette)? (?:is |appears |remains )?"
                     r"(?:mildly |moderately |severely |markedly )?(?:enlarged|increased)",
                     r"enlarge(?:d|ment of the) (?:heart|cardiac silhouette)", r"cardiac enlargement"),
    "Consolidation": (r"consolidat\w*",),
    "Edema": (r"(?:pulmonary |interstitial |alveolar )?edema", r"vascular congestion", r"pulmonary congestion",
              r"heart failure", r"\bchf\b"),
    "Enlarged Cardiomediastinum": (r"(?:widened|widening of the|enlarged) (?:cardio)?mediastin\w*",
                                   r"mediastinal (?:widening|enlargement)",
                                   r"cardiomediastinal silhouette (?:is |appears )?(?:enlarged|widened)"),
    "Fracture": (r"fracture[sd]?",),
    "Lung Lesion": (r"nodul\w*", r"mass(?:es)?", r"lesions?", r"tumou?rs?", r"neoplasm\w*", r"carcinoma"),
    "Lung Opacity": (r"opaci\w*", r"infiltrat\w*", r"densit(?:y|ies)", r"haziness", r"airspace disease",
                     r"ground[- ]glass"),
    "Pleural Effusion": (r"effusions?", r"pleural fluid", r"blunting of the (?:right |left |bilateral )?"
                         r"costophrenic"),
    "Pleural Other": (r"pleural thickening", r"pleural plaques?", r"fibrothorax", r"pleural scarring"),
    "Pneumonia": (r"pneumonias?", r"bronchopneumonia"),
    "Pneumothorax": (r"pneumothora(?:x|ces)", r"pneumothoraces"),
    "Support Devices": (r"(?:endotracheal|et|enteric|nasogastric|ng|og|chest|feeding|tracheostomy) tubes?",
                        r"catheters?", r"picc(?: line)?", r"central (?:venous )?line", r"pacemaker\w*",
                        r"pacer", r"(?:sternotomy )?wires", r"stents?", r"port-a-cath", r"\bports?\b",
                        r"defibrillator", r"\bicd\b", r"drains?", r"swan[- ]ganz", r"support devices?",
                        r"lines? and tubes?", r"tubes? and lines?"),
}

# cues (lower case); a pre-cue acts on mentions after it in its clause, a post-cue on mentions before it
NEGATION_PRE = (r"\bno\b", r"\bnot\b", r"\bwithout\b", r"negative for", r"free of", r"absence of", r"\bnor\b",
                r"rules? out", r"ruled out", r"resolution of", r"resolved", r"clear of", r"no evidence of",
                r"there is no", r"interval resolution", r"removal of", r"removed")
NEGATION_POST = (r"(?:is|are|was|were) (?:not|no longer) (?:seen|present|identified|visualized|appreciated|evident)",
                 r"(?:has|have) resolved", r"(?:is|are) absent", r"(?:has|have) been removed", r"not seen",
                 r"not identified", r"not present")
UNCERTAIN_PRE = (r"\bmay\b", r"\bmight\b", r"possibl[ey]", r"\bprobabl[ey]\b", r"questionabl[ey]", r"suspicious for",
                 r"concern(?:ing)? for", r"suggest\w*", r"cannot (?:be )?(?:excluded|ruled out)", r"can ?not exclude",
                 r"\bversus\b", r"\bvs\.?\b", r"differential", r"could (?:be|represent)", r"\blikely\b",
                 r"borderline", r"equivocal", r"not (?:be )?excluded", r"in the correct clinical setting",
                 r"would be difficult to exclude", r"\bpresum\w*", r"compatible with")
UNCERTAIN_POST = (r"(?:is|are) not excluded", r"cannot be (?:excluded|ruled out)", r"is possible",
                  r"(?:is|are) (?:suspected|questioned)", r"\bpossibly\b", r"not (?:be )?excluded",
                  r"^\s*(?:versus|vs\.?)\b")
# words that end a cue's scope: the clause boundary
CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|which|except|aside from|apart from|otherwise|while)\b|[;:]")
# phrases that look like a mention but are not one ("no new" does not negate what follows "old")
PSEUDO_NEGATION = (r"no (?:significant )?(?:change|interval change)", r"not (?:significantly )?changed",
                   r"no longer (?:seen )?as large")

_MENTION_RE = {label: re.compile(r"\b(?:" + "|".join(p for p in pats) + r")") for label, pats in MENTIONS.items()}


def _any(patterns: Iterable[str]) -> re.Pattern:
    return re.compile("|".join(f"(?:{p})" for p in patterns))


_NEG_PRE, _NEG_POST = _any(NEGATION_PRE), _any(NEGATION_POST)
_UNC_PRE, _UNC_POST = _any(UNCERTAIN_PRE), _any(UNCERTAIN_POST)
_PSEUDO = _any(PSEUDO_NEGATION)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def _clauses(text: str) -> list[str]:
    parts = []
    for sentence in _SENTENCE.split(text.lower()):
        pieces = CLAUSE_BREAK.split(sentence)
        parts.extend(p.strip() for p in pieces if p and p.strip())
    return parts


def _classify(clause: str, start: int, end: int) -> float:
    before, after = _PSEUDO.sub(" ", clause[:start]), clause[end:]
    if _NEG_PRE.search(before) or _NEG_POST.match(after.strip()) or _NEG_POST.search(after[:40]):
        return NEGATIVE
    if _UNC_PRE.search(before) or _UNC_POST.search(after[:40]) or _UNC_POST.match(after):
        return UNCERTAIN
    return POSITIVE


_RANK = {POSITIVE: 3, UNCERTAIN: 2, NEGATIVE: 1}


def label_report(text: Optional[str]) -> dict[str, Optional[float]]:
    """One report's CheXpert-style labels: 1 positive, 0 negative, -1 uncertain, None unmentioned."""
    out: dict[str, Optional[float]] = {label: None for label in CHEXPERT_LABELS}
    for clause in _clauses(text or ""):
        for label, pattern in _MENTION_RE.items():
            for m in pattern.finditer(clause):
                value = _classify(clause, m.start(), m.end())
                current = out[label]
                if current is None or _RANK[value] > _RANK[current]:
                    out[label] = value
    findings = [lab for lab in CHEXPERT_LABELS if lab not in ("No Finding", "Support Devices")]
    if not any(out[lab] in (POSITIVE, UNCERTAIN) for lab in findings):
        out["No Finding"] = POSITIVE
    return out


def rule_labeler(texts: Sequence[str]) -> np.ndarray:
    """Labels of many reports as an array ``[N, 14]`` (NaN for unmentioned), CheXpert label order."""
    rows = [[np.nan if v is None else v for v in label_report(t).values()] for t in texts]
    return np.asarray(rows, dtype=np.float32).reshape(len(rows), len(CHEXPERT_LABELS))


LABELERS: Registry = Registry("report labeler")
LABELERS.register("rules")(lambda: rule_labeler)


def binarise(labels: np.ndarray, uncertain_as: float = 0.0) -> np.ndarray:
    """1 for positive, ``uncertain_as`` for uncertain, 0 for negative or unmentioned."""
    out = np.where(labels == POSITIVE, 1.0, 0.0)
    return np.where(labels == UNCERTAIN, uncertain_as, out)


def clinical_efficacy(generated: Sequence[str], references: Sequence[str],
                      labeler: Callable[[Sequence[str]], np.ndarray] = rule_labeler,
                      uncertain_as: float = 0.0) -> dict:
    """Micro and macro F1 of the labels of generated reports against those of their references,
    over the 14 CheXpert labels and over the 5 competition findings, plus per-label F1.

    A label that neither the references nor the drafts ever mention has no F1 (``None`` in
    ``per_label_f1``) and stays out of the macro means (``labels_scored_14`` / ``_5`` count the
    rest): a corpus without, say, fractures cannot score a model on them. A label the drafts
    assert but no reference has scores 0.
    """
    from sklearn.metrics import f1_score

    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports for {len(references)} references")
    pred = binarise(labeler(generated), uncertain_as)
    true = binarise(labeler(references), uncertain_as)
    out: dict = {"per_label_f1": {}}
    for j, name in enumerate(CHEXPERT_LABELS):
        scored = true[:, j].any() or pred[:, j].any()
        out["per_label_f1"][name] = float(f1_score(true[:, j], pred[:, j], zero_division=0)) if scored else None
    for tag, names in (("14", CHEXPERT_LABELS), ("5", COMPETITION_LABELS)):
        idx = [CHEXPERT_LABELS.index(n) for n in names]
        out[f"f1_micro_{tag}"] = float(f1_score(true[:, idx], pred[:, idx], average="micro", zero_division=0))
        values = [out["per_label_f1"][n] for n in names if out["per_label_f1"][n] is not None]
        out[f"f1_macro_{tag}"] = float(np.mean(values)) if values else float("nan")
        out[f"labels_scored_{tag}"] = len(values)
    return out
