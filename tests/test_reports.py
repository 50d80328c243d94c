"""Report section parsing and the classifier's clinical-context text."""

from __future__ import annotations

import pytest

from medfuse_core.data.reports import (
    MAX_CONTEXT_WORDS,
    clinical_context,
    clinical_context_checked,
    extract_sections,
    finding_statements,
)

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


# --------------------------------------------------------------- real-archive layouts (review H2)

OLD_STYLE = """                                 FINAL REPORT
 REASON FOR EXAMINATION:  Evaluation of the patient with shortness of breath.
 \n Portable AP radiograph of the chest was reviewed in comparison to ___.
 \n Large right pleural effusion has increased.  Moderate pulmonary edema.  Right IJ
 line tip is at the level of mid SVC.
"""
OLD_STYLE_READ = ("Portable AP radiograph", "reviewed in comparison", "pleural effusion", "pulmonary edema",
                  "Right IJ", "mid SVC")


def test_h2_old_style_headerless_body_is_not_context():
    ctx, status = clinical_context_checked(OLD_STYLE)
    assert (ctx, status) == ("Evaluation of the patient with shortness of breath.", "ok")
    s = extract_sections(OLD_STYLE)
    assert s["findings"].startswith("Portable AP radiograph") and "mid SVC" in s["findings"]
    # the MIMIC-CXR fallback: no FINDINGS/IMPRESSION header -> the final paragraph
    assert s["last_paragraph"].startswith("Large right pleural effusion has increased.")
    for leaked in OLD_STYLE_READ:
        assert leaked not in ctx


@pytest.mark.parametrize("text", [
    "INDICATION: cough. FINDINGS: Right lower lobe pneumonia.",
    " INDICATION:  cough.  Findings:  Right lower lobe pneumonia.\n IMPRESSION: Pneumonia.",
    "INDICATION: cough FINDINGS Right lower lobe pneumonia. IMPRESSION Pneumonia.",
])
def test_h2_findings_on_the_indication_line(text):
    ctx, status = clinical_context_checked(text)
    assert status == "ok" and ctx.rstrip(".") == "cough"
    assert "Right lower lobe pneumonia." in extract_sections(text)["findings"]


@pytest.mark.parametrize("text", [
    "INDICATION fever FINDINGS Left lower lobe consolidation. IMPRESSION Pneumonia.",
    "INDICATION: fever\nFINDINGS\nLeft lower lobe consolidation.\nIMPRESSION\nPneumonia.",
    "INDICATION fever\nFINDINGS Left lower lobe consolidation.\nIMPRESSION Pneumonia.",
    "Indication: fever\n\nFindings\n\nLeft lower lobe consolidation.\n\nImpression\n\nPneumonia.",
])
def test_h2_headers_without_colon(text):
    assert clinical_context_checked(text) == ("fever", "ok")
    s = extract_sections(text)
    assert s["findings"] == "Left lower lobe consolidation." and s["impression"] == "Pneumonia."


def test_indication_ends_at_blank_line_and_spans_wrapped_lines():
    text = " INDICATION:  ___M with shortness of breath and\n   leg swelling, eval for CHF\n \n Lungs are clear.\n"
    assert clinical_context(text) == "___M with shortness of breath and leg swelling, eval for CHF"
    assert extract_sections(text)["findings"] == "Lungs are clear."
    # a bare header: the indication is the next paragraph
    assert clinical_context(" INDICATION:\n \n ___F with cough\n \n COMPARISON: None.") == "___F with cough"


def test_synonym_and_mixed_case_headers():
    for header in ("REASON FOR EXAMINATION:", "Reason for exam:", "CLINICAL HISTORY:", "Clinical information:",
                   "PATIENT HISTORY:", "Indications:", "clinical indication:"):
        text = f" {header}  fever, cough\n \n Conclusion: Right lower lobe pneumonia."
        assert clinical_context_checked(text) == ("fever, cough", "ok"), header
        assert extract_sections(text)["impression"] == "Right lower lobe pneumonia."


def test_wet_read_and_addendum_are_never_context():
    text = (" WET READ: ___ ___ 10:41 PM\n   Large right pneumothorax.\n \n" + " " * 33 + "FINAL REPORT\n"
            " INDICATION:  s/p chest tube for pneumothorax\n \n FINDINGS:  Right chest tube in place.\n"
            " \n ADDENDUM:\n \n Findings discussed with Dr. ___ at 10:50.\n")
    s = extract_sections(text)
    assert s["wet_read"] == "___ ___ 10:41 PM Large right pneumothorax."
    assert s["addendum"] == "Findings discussed with Dr. ___ at 10:50."
    assert clinical_context_checked(text) == ("s/p chest tube for pneumothorax", "ok")
    # an addendum or wet read above the banner, without colon
    text = " ADDENDUM\n Tip of the catheter in the SVC.\n \n FINAL REPORT\n HISTORY: line placement\n"
    assert clinical_context(text) == "line placement" and "SVC" in extract_sections(text)["addendum"]
    text = " WET READ VERSION #1 ___ 9:14 PM  No pneumothorax.\n FINAL REPORT\n INDICATION: r/o ptx\n"
    assert clinical_context(text) == "r/o ptx"


def test_lower_case_words_are_not_headers():
    text = "INDICATION: fall\nFINDINGS: Findings are consistent with a rib fracture.\n history of similar falls\n"
    s = extract_sections(text)
    assert s["findings"] == "Findings are consistent with a rib fracture. history of similar falls"
    assert clinical_context("INDICATION: eval exam: crackles") == "eval exam: crackles"


def test_headerless_report_is_findings_and_unknown_header_normalised():
    assert extract_sections("Heart normal.\n \nLungs clear.") == {
        "findings": "Heart normal. Lungs clear.", "last_paragraph": "Lungs clear."}
    s = extract_sections("CHEST, TWO VIEWS:  Lungs clear.\nHISTORY: cough")
    assert s == {"findings": "Lungs clear.", "indication": "cough"}


# ----------------------------------------------------------------------------- context check

KEPT = ["eval for pneumonia", "r/o pneumothorax", "?CHF", "assess for effusion", "history of lung cancer",
        "s/p chest tube for pneumothorax", "___M with SOB, eval for effusion", "Pneumothorax.", "f/u pneumonia",
        "evaluate for interval change in effusion", "known right pleural effusion, eval",
        "___F with large right effusion s/p thoracentesis", "concern for pulmonary edema", "ETT placement",
        "___-year-old man with pneumonia, assess for improvement", "question of new infiltrate",
        "worsening dyspnea, h/o CHF", "pleuritic chest pain", "rule out pneumonia", "hypoxia, ? aspiration",
        "___ y/o female with mild SOB and known small nodule", "evaluate ETT position", "recent PICC line placement",
        "fall, rib pain, r/o fracture", "1.5 cm nodule on CT, follow-up", "SOB and leg swelling, eval for CHF"]
DROPPED = ["There is a large right pleural effusion.", "No pneumothorax.", "Heart size is normal.", "lungs are clear",
           "unchanged from prior", "consistent with pulmonary edema", "Moderate pulmonary edema.",
           "Large right pleural effusion has increased.", "Endotracheal tube terminates 4 cm above the carina.",
           "No acute cardiopulmonary process.", "The cardiomediastinal silhouette is within normal limits.",
           "Right IJ line tip is at the level of mid SVC.", "Compared to the prior study there is no change.",
           "Small bilateral effusions.", "ET tube in standard position.", "Bibasilar atelectasis is seen.",
           "Lung mass, further evaluation with CT recommended.", "A 2.1 cm nodule in the left lung."]


@pytest.mark.parametrize("indication", KEPT)
def test_clinical_questions_naming_findings_are_kept(indication):
    assert finding_statements(indication) == []
    assert clinical_context_checked(f"INDICATION: {indication}\n \nFINDINGS: Lungs clear.") == (indication, "ok")


@pytest.mark.parametrize("statement", DROPPED)
def test_radiologist_statements_in_the_indication_are_dropped(statement):
    assert finding_statements(statement) == [statement]
    text = f"INDICATION: ___M with cough. {statement}\nFINDINGS: see above"
    assert clinical_context_checked(text) == ("", "dropped_findings")
    assert clinical_context(text) == ""


def test_context_statuses():
    assert clinical_context_checked("FINDINGS: Lungs clear.") == ("", "none")
    assert clinical_context_checked("") == ("", "none")
    long = " ".join(["cough"] * (MAX_CONTEXT_WORDS + 1))
    assert clinical_context_checked(f"INDICATION: {long}\n \nFINDINGS: clear") == ("", "dropped_long")
    ok = " ".join(["cough"] * MAX_CONTEXT_WORDS)
    assert clinical_context_checked(f"INDICATION: {ok}\n \nFINDINGS: clear") == (ok, "ok")
    # the run-on layout the parser cannot split: caught by the statement check
    runon = "HISTORY: Shortness of breath.\n There is a large right pleural effusion.\n"
    assert clinical_context_checked(runon) == ("", "dropped_findings")
