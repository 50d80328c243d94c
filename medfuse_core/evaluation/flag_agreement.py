"""Drafts that say what their findings flags say (classification-guided drafting's last step).

A guided report model's LM reads its findings head's flags as a prompt, and the reranker keeps the
candidate agreeing most with them, yet a draft can still leave a flagged finding out or state one the
head did not flag. With ``decoding.flag_agreement``:

* ``add``: each flagged finding that no sentence of the draft states positively gets a sentence, in
  FINDINGS and in IMPRESSION (where it replaces the normal sentences, "no acute process"), and a
  sentence denying it is removed;
* ``exact``: the same, and sentences stating an unflagged finding positively are removed first.

Both keep a sentence that a section repeats once.

The sentences are the training reports' own (the template-completion idea of classifier-guided
report writing): per set of findings, the commonest sentence of each section that the rule labeler
reads as stating exactly those findings, without a hedge, mined once when training ends
(:func:`mine_flag_sentences`) and kept in the model bundle. A sentence must occur in the reports of at
least ``min_patients`` different patients, so no sentence particular to one patient is ever kept. The
sentence keeps the training reports' wording, side and size included: the head flags a finding, not
where it is.
"""

from __future__ import annotations

from collections import defaultdict
from itertools import count
from typing import Collection, Iterable, Sequence

import numpy as np

from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.evaluation.report_labeler import NEGATIVE, POSITIVE, UNCERTAIN, rule_labeler
from medfuse_core.objectives.alignment import report_sentences

MODES = ("none", "add", "exact")
SECTIONS = ("findings", "impression")
NORMAL = "No Finding"


def _stated(labels: np.ndarray) -> list[frozenset | None]:
    """Per labelled sentence (rows of ``[N, 14]``), the set of labels it states positively (empty for a
    sentence stating no finding), or None when it hedges a finding (uncertain scores as negative)."""
    out: list[frozenset | None] = []
    for row in labels:
        if (row == UNCERTAIN).any():
            out.append(None)
        else:
            out.append(frozenset(CHEXPERT_LABELS[j] for j in np.flatnonzero(row == POSITIVE)
                                 if CHEXPERT_LABELS[j] != NORMAL))
    return out


def mine_flag_sentences(reports: Iterable[str], names: Sequence[str], patients: Iterable[str] | None = None,
                        style=lambda s: s, min_patients: int = 3, max_reports: int = 20000) -> dict[str, list[dict]]:
    """``{section: [{"labels": [...], "text": sentence}, ...]}``, commonest first: per set of labels
    out of ``names`` that a sentence of the section states positively (and nothing else, no hedge),
    the commonest such sentence among the first ``max_reports`` reports, kept when the reports of at
    least ``min_patients`` patients hold it (``patients``, parallel to ``reports``; without them each
    report counts as its own patient). Normal sentences (the empty set) are taken from reports stating
    no finding and no device, every one that is common enough: they are the archive's ways of
    saying "normal". ``style`` maps a sentence to the LM's writing (e.g. lower case); memory is
    bounded by ``max_reports``."""
    from medfuse_core.data.reports import extract_sections

    wanted = set(names) - {NORMAL}
    counts: dict[str, dict] = {s: defaultdict(set) for s in SECTIONS}   # (labels, sentence) -> patients
    for k, (report, patient) in enumerate(zip(reports, patients if patients is not None else count())):
        if k >= max_reports:
            break
        found = extract_sections(report or "")
        texts = {s: sorted({style(t) for t in report_sentences(found.get(s, ""))}) for s in SECTIONS}
        every = [t for s in SECTIONS for t in texts[s]]
        if not every:
            continue
        stated = _stated(rule_labeler(every))
        normal_report = all(x is not None and not x for x in stated)
        i = 0
        for s in SECTIONS:
            for sentence in texts[s]:
                labels, i = stated[i], i + 1
                if labels is None or not labels <= wanted or (not labels and not normal_report):
                    continue
                counts[s][(tuple(sorted(labels)), sentence)].add(patient)
    out: dict[str, list[dict]] = {s: [] for s in SECTIONS}
    for s, held in counts.items():
        seen = set()
        for (labels, sentence), who in sorted(held.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            if len(who) >= min_patients and (labels not in seen or not labels):
                seen.add(labels)
                out[s].append({"labels": list(labels), "text": sentence})
    return out


def _pick(entries: list[dict], missing: set, flagged: set) -> list[str]:
    """Sentences covering ``missing`` greedily, each stating only flagged findings."""
    chosen = []
    while missing:
        fits = [e for e in entries if e["labels"] and set(e["labels"]) <= flagged and missing & set(e["labels"])]
        if not fits:
            break
        best = max(fits, key=lambda e: len(missing & set(e["labels"])))   # max keeps the commonest of ties
        chosen.append(best["text"])
        missing = missing - set(best["labels"])
    return chosen


def agree_with_flags(drafts: Sequence[str], flags, names: Sequence[str], sentences: dict[str, list[dict]],
                     mode: str = "add", abstain: Collection[str] = ()) -> list[str]:
    """``drafts`` (``FINDINGS: ...`` / ``IMPRESSION: ...``) made to state each flagged finding
    (``flags [B, L]`` over ``names``) with the mined ``sentences``; ``exact`` first removes the
    sentences stating an unflagged finding, except those of the ``abstain`` findings (the ones the
    head never flags: it has no opinion on them). A finding no mined sentence states alone (or with
    other flagged findings only) is left as the draft has it."""
    from medfuse_core.data.reports import extract_sections
    from medfuse_core.models.report import EMPTY_SECTION, FINDINGS_HEADER, IMPRESSION_HEADER

    if mode not in MODES:
        raise ValueError(f"flag agreement mode {mode!r}: one of {', '.join(MODES)}")
    if mode == "none":
        return list(drafts)
    wanted = np.asarray(flags.cpu() if hasattr(flags, "cpu") else flags, dtype=bool)
    scope = set(names) - {NORMAL}
    normals = {s: [e["text"] for e in sentences.get(s, []) if not e["labels"]] for s in SECTIONS}
    out = []
    for draft, row in zip(drafts, wanted):
        flagged = {n for n, f in zip(names, row) if f} & scope
        found = extract_sections(draft)
        parts = {s: list(dict.fromkeys(t for t in report_sentences(found.get(s, "")) if t != EMPTY_SECTION))
                 for s in SECTIONS}   # a sentence repeated inside a section is kept once
        stated: dict[str, set] = {}
        denied: dict[str, list] = {}
        for s in SECTIONS:
            labels = rule_labeler(parts[s]) if parts[s] else np.zeros((0, len(CHEXPERT_LABELS)))
            positive = [set(x or ()) & scope for x in _stated(labels)]
            denied[s] = [{CHEXPERT_LABELS[j] for j in np.flatnonzero(r == NEGATIVE)} for r in labels]
            if mode == "exact":
                keep = [not (p - flagged - set(abstain)) for p in positive]
                parts[s], positive, denied[s] = ([x for x, k in zip(xs, keep) if k]
                                                 for xs in (parts[s], positive, denied[s]))
            stated[s] = set().union(*positive)
        missing = flagged - stated["findings"] - stated["impression"]
        for s in SECTIONS:   # "no pneumothorax" goes where a pneumothorax is added
            parts[s] = [t for t, d in zip(parts[s], denied[s]) if not d & missing]
        added = {s: _pick(sentences.get(s, []), set(missing), flagged) for s in SECTIONS}
        for s in SECTIONS:   # a fragment cut by the token budget would run into the added sentence
            if added[s] and parts[s] and parts[s][-1][-1] not in ".!?":
                parts[s] = parts[s][:-1]
        parts["findings"] += added["findings"]
        if added["impression"]:   # a normal impression ("no acute process") would contradict the added findings
            kept = [t for t in parts["impression"] if t not in normals["impression"]]
            parts["impression"] = kept + added["impression"]
        for s in SECTIONS:   # a section emptied by the removals reads normal when nothing is flagged
            if not parts[s] and not flagged:
                parts[s] = normals[s][:1]
        text = {s: " ".join(t for t in parts[s] if t) or EMPTY_SECTION for s in SECTIONS}
        out.append(f"{FINDINGS_HEADER} {text['findings']}\n{IMPRESSION_HEADER} {text['impression']}")
    return out
