"""The rule-based report labeler on hand-written sentences, and clinical-efficacy F1."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse_core.evaluation.report_labeler import (COMPETITION_LABELS, LABELERS, clinical_efficacy, label_report,
                                                    rule_labeler)

P, N, U = 1.0, 0.0, -1.0

CASES = [
    ("There is a large right pleural effusion.", {"Pleural Effusion": P}),
    ("No pleural effusion or pneumothorax.", {"Pleural Effusion": N, "Pneumothorax": N}),
    ("Lungs are clear without consolidation, effusion or pneumothorax.",
     {"Consolidation": N, "Pleural Effusion": N, "Pneumothorax": N}),
    ("The heart is mildly enlarged.", {"Cardiomegaly": P}),
    ("Moderate cardiomegaly with mild pulmonary edema.", {"Cardiomegaly": P, "Edema": P}),
    ("Opacity at the left base may represent atelectasis or pneumonia.",
     {"Lung Opacity": P, "Atelectasis": U, "Pneumonia": U}),
    ("Pneumonia cannot be excluded.", {"Pneumonia": U}),
    ("Possible small left apical pneumothorax.", {"Pneumothorax": U}),
    ("No focal consolidation, but there is a small left effusion.", {"Consolidation": N, "Pleural Effusion": P}),
    ("The previously seen pneumothorax has resolved.", {"Pneumothorax": N}),
    ("Right internal jugular catheter terminates in the SVC. Endotracheal tube 4 cm above the carina.",
     {"Support Devices": P}),
    ("The endotracheal tube has been removed.", {"Support Devices": N}),
    ("Lines and tubes as described.", {"Support Devices": P}),   # medfuse synth's impression phrase
    ("Tubes and lines are in standard position.", {"Support Devices": P}),
    ("A 1.5 cm nodule in the right upper lobe.", {"Lung Lesion": P}),
    ("Healed left rib fractures.", {"Fracture": P}),
    ("Findings suggestive of early congestive heart failure.", {"Edema": U}),
    ("Widened mediastinum.", {"Enlarged Cardiomediastinum": P}),
    ("Stable left pleural thickening.", {"Pleural Other": P}),
    ("No acute cardiopulmonary process.", {}),
    ("Effusion is not seen.", {"Pleural Effusion": N}),
    ("Atelectasis versus consolidation in the left lower lobe.", {"Atelectasis": U, "Consolidation": U}),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_labels_of_hand_written_sentences(text, expected):
    labels = label_report(text)
    for name, value in expected.items():
        assert labels[name] == value, (text, name, labels[name])
    others = [n for n in labels if n not in expected and n != "No Finding"]
    assert all(labels[n] is None for n in others), {n: labels[n] for n in others if labels[n] is not None}


def test_no_finding_follows_the_findings():
    assert label_report("No acute cardiopulmonary process.")["No Finding"] == P
    assert label_report("Lines and tubes in place. No effusion.")["No Finding"] == P  # devices do not count
    assert label_report("Small effusion.")["No Finding"] is None
    assert label_report("Possible effusion.")["No Finding"] is None


def test_the_strongest_mention_wins_across_sentences():
    text = "No pneumothorax on the left. Small right apical pneumothorax."
    assert label_report(text)["Pneumothorax"] == P


def test_clinical_efficacy_scores_matching_reports_perfectly_and_others_lower():
    refs = ["Large left effusion. Cardiomegaly.", "No effusion. Right lower lobe consolidation.",
            "Mild pulmonary edema.", "No acute process."]
    perfect = clinical_efficacy(refs, refs)
    assert perfect["f1_macro_5"] == 1.0 and perfect["f1_macro_14"] == 1.0
    assert perfect["f1_micro_14"] == 1.0 and perfect["f1_micro_5"] == 1.0
    # labels nobody mentions are not scored; Atelectasis is not in these references
    assert perfect["per_label_f1"]["Atelectasis"] is None and perfect["labels_scored_5"] == 4
    hallucinated = clinical_efficacy(refs[:3] + ["Left basilar atelectasis."], refs)
    assert hallucinated["per_label_f1"]["Atelectasis"] == 0.0 and hallucinated["labels_scored_5"] == 5
    assert hallucinated["f1_macro_5"] < 1.0
    empty = clinical_efficacy(["No acute process."] * 4, refs)
    assert empty["f1_micro_5"] < perfect["f1_micro_5"]
    assert set(empty) >= {"f1_micro_14", "f1_macro_14", "f1_micro_5", "f1_macro_5", "per_label_f1"}
    with pytest.raises(ValueError):
        clinical_efficacy(refs[:2], refs)


def test_labeler_registry_and_array_shape():
    labeler = LABELERS.get("rules")()
    arr = labeler(["Small effusion.", ""])
    assert arr.shape == (2, 14) and arr.dtype == np.float32
    assert np.isnan(arr[1]).sum() == 13  # an empty report mentions nothing (No Finding is set)
    assert np.array_equal(arr, rule_labeler(["Small effusion.", ""]), equal_nan=True)
