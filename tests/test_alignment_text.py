"""Stage-1 training text: the FINDINGS + IMPRESSION pairing and ConVIRT-style sentence sampling."""

from __future__ import annotations

import torch

from medfuse_core.objectives.alignment import report_sentences, report_text, sample_sentences

REPORT = """EXAMINATION: CHEST (PA AND LAT)
INDICATION: ___ with cough.
FINDINGS: Small left pleural effusion. No pneumothorax; heart size is normal.
IMPRESSION: Small left effusion.
"""


def test_report_text_pairs_findings_and_impression_only():
    text = report_text(REPORT)
    assert "effusion" in text and "cough" not in text and "EXAMINATION" not in text


def test_sentences_split_on_stops_and_semicolons():
    assert report_sentences("Small left pleural effusion. No pneumothorax; heart size is normal.  Stable.") == [
        "Small left pleural effusion.", "No pneumothorax;", "heart size is normal.", "Stable."]
    assert report_sentences("") == []
    assert report_sentences("No change") == ["No change"]


def test_sample_sentences_draws_one_sentence_each_and_is_seeded():
    texts = [report_text(REPORT), "", "One finding only."]
    a = sample_sentences(texts, torch.Generator().manual_seed(3))
    b = sample_sentences(texts, torch.Generator().manual_seed(3))
    assert a == b
    assert a[0] in report_sentences(texts[0]) and a[1] == "" and a[2] == "One finding only."
    seen = {sample_sentences(texts[:1], torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert seen == set(report_sentences(texts[0]))  # every sentence gets drawn
