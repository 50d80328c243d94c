"""BLEU-4 / ROUGE-L from their libraries, the report layout check, identifier leaks."""

from __future__ import annotations

import pytest

from medfuse_core.evaluation.report_metrics import (ends_mid_sentence, has_findings_and_impression, leaked_identifiers,
                                                    nlg_metrics)

REF = "FINDINGS: Small left pleural effusion. No pneumothorax. IMPRESSION: Small left effusion."


def test_identical_reports_score_one_and_others_lower():
    same = nlg_metrics([REF, REF], [REF, REF])
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)
    other = nlg_metrics(["FINDINGS: Heart size normal. IMPRESSION: Normal chest."] * 2, [REF, REF])
    assert other["bleu4"] < 0.3 and other["rouge_l"] < same["rouge_l"]
    with pytest.raises(ValueError):
        nlg_metrics([REF], [REF, REF])


def test_layout_check():
    assert has_findings_and_impression(REF)
    assert has_findings_and_impression("FINDINGS:\nLungs clear.\n\nIMPRESSION:\nNo acute process.")
    assert not has_findings_and_impression("FINDINGS: Lungs clear.")
    assert not has_findings_and_impression("Lungs clear. No acute process.")


def test_drafts_cut_by_the_token_budget_are_counted():
    cut = "FINDINGS: Right and left small pleural effusions.\nIMPRESSION: Right and left small pleural"
    assert not ends_mid_sentence(REF) and not ends_mid_sentence(REF + "  \n")
    assert ends_mid_sentence(cut) and ends_mid_sentence("")
    from pipelines.evaluate_report import score_drafts

    assert score_drafts([REF, cut, cut], [REF] * 3)["drafts_ending_mid_sentence"] == 2


def test_leaked_identifiers_are_found_on_word_boundaries():
    texts = ["Compared with the study of 2150-03-04, stable.", "Dr. Hartwell was paged.", "Normal."]
    leaks = leaked_identifiers(texts, ["2150-03-04", "Hartwell", "Hart", "ab", "p10000032"])
    assert (0, "2150-03-04") in leaks and (1, "Hartwell") in leaks
    assert all(k != 2 for k, _ in leaks) and not any(v.lower() == "hart" for _, v in leaks)
