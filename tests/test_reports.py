"""Report section parsing and the classifier's clinical-context text."""

from __future__ import annotations

from medfuse_core.reports import clinical_context, extract_sections

MIMIC_STYLE = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___M with shortness of breath  // eval for effusion

 COMPARISON:  Chest radiograph ___.

 FINDINGS:

 PA and lateral views of the chest provided.  There is a moderate left
 pleural effusion.  No pneumothorax.  Heart size is normal.

 IMPRESSION:

 Moderate left pleural effusion.
"""


def test_sections_parsed():
    s = extract_sections(MIMIC_STYLE)
    assert s["examination"] == "CHEST (PA AND LAT)"
    assert s["indication"] == "___M with shortness of breath // eval for effusion"
    assert s["comparison"] == "Chest radiograph ___."
    assert s["findings"].startswith("PA and lateral views") and "moderate left pleural effusion" in s["findings"]
    assert s["impression"] == "Moderate left pleural effusion."
    assert "preamble" not in s  # the FINAL REPORT banner is not content


def test_clinical_context_is_indication_only():
    ctx = clinical_context(MIMIC_STYLE)
    assert ctx == "___M with shortness of breath // eval for effusion"
    for leaked in ("effusion.", "pneumothorax", "Heart size", "Moderate left", "PA and lateral", "CHEST (PA"):
        assert leaked not in ctx


def test_history_aliases_map_to_indication():
    text = (
        "FINAL REPORT\n CLINICAL HISTORY: fever, cough\n TECHNIQUE: PA and lateral\n"
        " FINDINGS: Right lower lobe consolidation.\n IMPRESSION: Pneumonia.\n"
    )
    s = extract_sections(text)
    assert s["indication"] == "fever, cough" and s["technique"] == "PA and lateral"
    assert clinical_context(text) == "fever, cough"
    assert clinical_context("REASON FOR EXAMINATION: line placement\nFINDINGS: tube in place") == "line placement"
    assert clinical_context("HISTORY: preop\n\nIMPRESSION: normal") == "preop"


def test_indication_and_history_are_joined():
    text = " INDICATION: chest pain\n HISTORY: prior CABG\n FINDINGS: clear"
    assert clinical_context(text) == "chest pain prior CABG"


def test_absent_indication_gives_empty_string():
    assert clinical_context("FINDINGS: Large right pneumothorax.\nIMPRESSION: Pneumothorax.") == ""
    assert clinical_context("Large right pneumothorax, no headers at all.") == ""
    assert clinical_context("") == ""
    assert extract_sections("") == {}


def test_other_upper_case_headers_end_sections():
    text = (
        " INDICATION: trauma\n FINDINGS: No fracture.\n IMPRESSION: Normal.\n"
        " NOTIFICATION: Findings discussed with Dr. ___ at 10:30 by phone.\n"
    )
    s = extract_sections(text)
    assert s["impression"] == "Normal."
    assert s["notification"].startswith("Findings discussed") and "10:30" in s["notification"]
    assert clinical_context(text) == "trauma"


def test_mixed_case_known_headers_and_inline_colons():
    text = "Indication: cough\nFindings: Time noted 10:30: lungs clear.\nImpression: normal"
    s = extract_sections(text)
    assert s == {"indication": "cough", "findings": "Time noted 10:30: lungs clear.", "impression": "normal"}
