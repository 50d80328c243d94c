"""Scores of generated radiology reports: BLEU-4 and ROUGE-L (sacrebleu, rouge-score), the
FINDINGS / IMPRESSION layout, and identifiers of the training corpus leaking into generated text.

Clinical accuracy (label F1) lives in :mod:`medfuse_core.evaluation.report_labeler`.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from medfuse_core.data.reports import extract_sections


def nlg_metrics(generated: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU-4 (sacrebleu, 13a tokenisation) and mean ROUGE-L F1 (rouge-score, stemmed), in [0, 1]."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(generated) != len(references):
        raise ValueError(f"{len(generated)} generated reports for {len(references)} references")
    if not generated:
        return {"bleu4": float("nan"), "rouge_l": float("nan")}
    bleu = sacrebleu.corpus_bleu(list(generated), [list(references)]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(ref, gen)["rougeL"].fmeasure for gen, ref in zip(generated, references)]
    return {"bleu4": float(bleu), "rouge_l": float(sum(rouge) / len(rouge))}


def has_findings_and_impression(text: str) -> bool:
    """True when a report has non-empty FINDINGS and IMPRESSION sections (any header spelling the
    report parser knows)."""
    sections = extract_sections(text or "")
    return bool(sections.get("findings", "").strip()) and bool(sections.get("impression", "").strip())


def ends_mid_sentence(text: str) -> bool:
    """True when a report's text stops inside a sentence (its last character is not ``.``, ``!``
    or ``?``): a draft that ran out of ``decoding.max_new_tokens`` before it ended."""
    return not (text or "").rstrip().endswith((".", "!", "?"))


def leaked_identifiers(texts: Sequence[str], identifiers: Iterable[str], min_length: int = 4) -> list[tuple[int, str]]:
    """``(text index, identifier)`` for every identifier (names, ids, dates of the training corpus)
    found in a text, case-insensitive and on word boundaries; identifiers shorter than
    ``min_length`` are skipped (they match by chance)."""
    ids = sorted({str(i).strip() for i in identifiers if len(str(i).strip()) >= min_length}, key=len, reverse=True)
    if not ids:
        return []
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(i) for i in ids) + r")(?!\w)", re.IGNORECASE)
    return [(k, m.group(0)) for k, text in enumerate(texts) for m in pattern.finditer(text or "")]
