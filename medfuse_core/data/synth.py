"""Synthetic chest X-ray corpus in the public MIMIC-CXR layout.

:func:`generate_corpus` writes::

    out_dir/
      files/pNN/pSUBJECT/sSTUDY/<dicom_id>.dcm   DX DICOM, one per view
      files/pNN/pSUBJECT/sSTUDY.txt              free-text report
      mimic-cxr-2.0.0-chexpert.csv.gz            subject_id, study_id, 14 CheXpert labels
      mimic-cxr-2.0.0-split.csv.gz               dicom_id, study_id, subject_id, split
      mimic-cxr-2.0.0-metadata.csv.gz            per-image DICOM metadata

so the ingest code that reads MIMIC-CXR reads it unchanged. The tables are gzipped as
released (plain ``.csv`` with ``tables="csv"``) and labelled as released: 1.0 positive, -1.0
uncertain, 0.0 explicitly negated, blank not mentioned; "No Finding" is 1.0 on normal studies
and blank otherwise. Images are drawn with numpy (additive attenuation model: body, lungs,
mediastinum, heart, diaphragm, ribs, clavicles, spine, vessel texture, noise) and carry a
clear visual signature for each finding the labels and report claim:

* Cardiomegaly: heart half-width 0.44-0.52 of the half-thorax scale vs 0.26-0.32.
* Enlarged Cardiomediastinum: upper mediastinum half-width 0.22-0.28 vs 0.10-0.14.
* Pleural Effusion: fluid filling a lung base up to a meniscus rising laterally,
  hiding the dome and costophrenic angle; one side or both.
* Pneumothorax: a dark, marking-free rim at the apex/lateral lung behind a thin
  bright visceral pleural line.
* Lung Lesion: 1-3 round, slightly lobulated nodules/masses.
* Consolidation: a dense patchy opacity with air bronchograms in one lobe region.
* Edema: bilateral perihilar ("bat-wing") haze with coarser vessels.
* Atelectasis: thin plate-like bands at one or both lung bases.
* Support Devices: bright tubes and lines (ETT, NG tube, central line, pacemaker
  generator with leads).

Uncertain (-1) findings are drawn faintly. Lateral views (about 30% of studies) show
the same findings in lateral geometry. Encodings vary as in real archives:
MONOCHROME1/2, 12 bits stored in 16, rescale slope/intercept, RLE Lossless, VOI
windows, several (not always square) sizes. Same seed gives byte-identical files on the
same platform and library versions (seeded UIDs, fixed dates, deterministic RLE).
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.data.sources import CHEXPERT_TABLE, METADATA_TABLE, SPLIT_TABLE, table_path  # noqa: F401 (re-exported)

UID_ROOT = "1.2.826.0.1.3680043.8.498."
DX_FOR_PRESENTATION = UID("1.2.840.10008.5.1.4.1.1.1.1")
IMPLEMENTATION_UID = UID(UID_ROOT + "1")

# Table file suffix per ``generate_corpus(tables=...)``; the names are ``<*_TABLE stem><suffix>``.
TABLE_SUFFIX = {"gz": ".csv.gz", "csv": ".csv"}
METADATA_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "PerformedProcedureStepDescription",
    "ViewPosition",
    "Rows",
    "Columns",
    "StudyDate",
    "StudyTime",
    "ProcedureCodeSequence_CodeMeaning",
    "ViewCodeSequence_CodeMeaning",
    "PatientOrientationCodeSequence_CodeMeaning",
)

# Internal finding keys (drawn) -> CheXpert label.
FINDINGS = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "consolidation": "Consolidation",
    "edema": "Edema",
    "ecm": "Enlarged Cardiomediastinum",
    "lesion": "Lung Lesion",
    "effusion": "Pleural Effusion",
    "pneumothorax": "Pneumothorax",
    "devices": "Support Devices",
}
PATHOLOGIES = tuple(k for k in FINDINGS if k != "devices")
PARENCHYMAL = ("consolidation", "edema", "lesion", "atelectasis")

# P(positive), P(uncertain) given an abnormal study; P(negation mentioned | absent).
_P_POS = {"atelectasis": 0.26, "cardiomegaly": 0.28, "consolidation": 0.27, "edema": 0.24,
          "ecm": 0.24, "lesion": 0.26, "effusion": 0.30, "pneumothorax": 0.24}
_P_UNC = {"atelectasis": 0.05, "cardiomegaly": 0.05, "consolidation": 0.06, "edema": 0.05,
          "ecm": 0.05, "lesion": 0.05, "effusion": 0.06, "pneumothorax": 0.04}
_P_NEG = {"atelectasis": 0.45, "cardiomegaly": 0.75, "consolidation": 0.8, "edema": 0.65,
          "ecm": 0.6, "lesion": 0.5, "effusion": 0.85, "pneumothorax": 0.85, "devices": 0.4}
_P_NORMAL = 0.32

_LAST = ("DOE", "ROE", "SMITH", "NGUYEN", "GARCIA", "MILLER", "KOWALSKI", "OKAFOR", "TANAKA",
         "MUELLER", "SILVA", "JOHANSSON", "PATEL", "BROWN", "LEBLANC", "ROSSI")
_FIRST_M = ("JOHN", "RICHARD", "ANDREW", "LUIS", "KENJI", "TOMASZ", "OLU", "ERIK")
_FIRST_F = ("JANE", "MARY", "ANNA", "SOFIA", "AKIKO", "MARTA", "ADA", "INGRID")
_INSTITUTIONS = ("SYNTHETIC GENERAL HOSPITAL", "EXAMPLE MEDICAL CENTER", "FICTIONAL UNIVERSITY HOSPITAL")
_PHYSICIANS = ("HOUSE^GREGORY", "QUINN^MICHAELA", "KILDARE^JAMES", "WELBY^MARCUS", "CAREY^ELIZABETH")
_STATIONS = ("DXROOM1", "DXROOM2", "PORTABLE3", "ERDX1")

Progress = Optional[Callable[[int, int], None]]


# =============================================================================== plans


@dataclass
class _ImagePlan:
    dicom_id: str
    view: str  # PA, AP, LATERAL, LL
    rows: int
    cols: int
    monochrome1: bool
    rescale: tuple[float, float] | None
    rle: bool
    window: bool
    series_uid: str
    sop_uid: str
    seed: tuple[int, ...]
    instance: int


@dataclass
class _StudyPlan:
    subject_id: int
    study_id: int
    sex: str
    patient_name: str
    birth_date: str
    study_date: str
    study_time: str
    accession: str
    study_uid: str
    institution: str
    physician: str
    station: str
    state: dict[str, int]  # finding -> 1 / -1 / 0
    spec: dict  # finding geometry, shared by the views
    labels: dict[str, float]
    report: str
    procedure: str
    split: str = "train"
    images: list[_ImagePlan] = field(default_factory=list)


class _Ids:
    """Unique, seeded identifiers."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.seen: set = set()

    def _unique(self, make):
        while True:
            value = make()
            if value not in self.seen:
                self.seen.add(value)
                return value

    def subject(self) -> int:
        return self._unique(lambda: int(self.rng.integers(10_000_000, 20_000_000)))

    def study(self) -> int:
        return self._unique(lambda: int(self.rng.integers(50_000_000, 60_000_000)))

    def dicom_id(self) -> str:
        return self._unique(lambda: "-".join(f"{int(v):08x}" for v in self.rng.integers(0, 2**32, 5)))

    def uid(self) -> str:
        return self._unique(lambda: UID_ROOT + str(int(self.rng.integers(1, 10**15))) + "."
                            + str(int(self.rng.integers(1, 10**15))))


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(len(seq)))]


# ------------------------------------------------------------------ finding sampling


def _sample_state(rng: np.random.Generator) -> dict[str, int]:
    state = {k: 0 for k in FINDINGS}
    if rng.random() >= _P_NORMAL:
        chf = rng.random() < 0.25  # correlated heart-failure picture
        for k in PATHOLOGIES:
            p_pos = _P_POS[k]
            if chf and k in ("cardiomegaly", "edema", "effusion"):
                p_pos = min(0.8, p_pos * 2.2)
            r = rng.random()
            state[k] = 1 if r < p_pos else (-1 if r < p_pos + _P_UNC[k] else 0)
        if not any(state[k] for k in PATHOLOGIES):
            state[_pick(rng, PATHOLOGIES)] = 1
    state["devices"] = 1 if rng.random() < 0.2 else 0
    return state


def _sample_spec(rng: np.random.Generator, state: dict[str, int]) -> dict:
    """Geometry of each finding, in view-independent terms (sides, lung-local coords)."""
    spec: dict = {}
    u = rng.uniform
    if state["cardiomegaly"]:
        spec["heart_hw"] = u(0.50, 0.58) if state["cardiomegaly"] == 1 else u(0.42, 0.45)
    else:
        spec["heart_hw"] = u(0.31, 0.37)
    if state["ecm"]:
        spec["med_w"] = u(0.22, 0.28) if state["ecm"] == 1 else u(0.17, 0.19)
    else:
        spec["med_w"] = u(0.10, 0.14)
    if state["effusion"]:
        strong = state["effusion"] == 1
        r = rng.random()
        sides = (-1, 1) if (strong and r < 0.4) else ((-1,) if r < 0.7 else (1,))
        spec["effusion"] = [(s, u(0.18, 0.42) if strong else u(0.07, 0.11)) for s in sides]
    if state["pneumothorax"]:
        strong = state["pneumothorax"] == 1
        side = -1 if rng.random() < 0.5 else 1
        spec["pneumothorax"] = (side, u(0.30, 0.55) if strong else u(0.72, 0.80),
                                u(0.0, 0.5) if strong else u(-0.45, -0.3))
    if state["lesion"]:
        strong = state["lesion"] == 1
        n = int(rng.integers(1, 4)) if strong else 1
        nodules = []
        for _ in range(n):
            side = -1 if rng.random() < 0.5 else 1
            vmax = 0.45 if side == -1 else 0.05  # keep left-lung nodules off the heart
            radius = u(0.06, 0.12) if strong else u(0.035, 0.045)
            nodules.append((side, u(-0.45, 0.55), u(-0.6, vmax), radius, u(0.22, 0.3) if strong else 0.14))
        spec["lesion"] = nodules
    if state["consolidation"]:
        strong = state["consolidation"] == 1
        side = -1 if rng.random() < 0.55 else 1
        zone = _pick(rng, (-0.45, 0.0, 0.42)) if side == -1 else _pick(rng, (-0.45, 0.42))
        spec["consolidation"] = (side, u(-0.1, 0.45), zone + u(-0.08, 0.08),
                                 u(0.6, 0.8) if strong else u(0.3, 0.38),
                                 u(0.32, 0.38) if strong else 0.13)
    if state["edema"]:
        spec["edema"] = u(0.2, 0.27) if state["edema"] == 1 else u(0.09, 0.12)
    if state["atelectasis"]:
        strong = state["atelectasis"] == 1
        r = rng.random()
        sides = (-1, 1) if (strong and r < 0.3) else ((-1,) if r < 0.65 else (1,))
        spec["atelectasis"] = [(s, u(-0.35, 0.35), u(0.52, 0.72), u(-0.25, 0.25), u(0.45, 0.75),
                                u(0.03, 0.045) if strong else 0.018, 0.45 if strong else 0.18)
                               for s in sides]
    if state["devices"]:
        kinds = ["ett", "ng", "line", "pacer"]
        rng.shuffle(kinds)
        chosen = kinds[: int(rng.integers(1, 4))]
        spec["devices"] = {k: (1 if rng.random() < 0.5 else -1, u(-0.55, -0.42)) for k in chosen}
    return spec


# ------------------------------------------------------------------ labels & reports


def _side_word(sides) -> str:
    sides = set(sides)
    if sides == {-1, 1}:
        return "bilateral"
    return "right" if sides == {-1} else "left"  # image left = patient right


def _labels(state: dict[str, int], neg: dict[str, bool],
            pneumonia: float, fracture_neg: bool, lungs_clear: bool) -> dict[str, float]:
    nan = float("nan")
    out = {name: nan for name in CHEXPERT_LABELS}
    for k, name in FINDINGS.items():
        s = state[k]
        out[name] = 1.0 if s == 1 else (-1.0 if s == -1 else (0.0 if neg[k] else nan))
    par = [state[k] for k in PARENCHYMAL]
    if 1 in par:
        out["Lung Opacity"] = 1.0
    elif -1 in par:
        out["Lung Opacity"] = -1.0
    elif lungs_clear:
        out["Lung Opacity"] = 0.0
    out["Pneumonia"] = pneumonia
    if fracture_neg:
        out["Fracture"] = 0.0
    abnormal = any(state[k] for k in PATHOLOGIES) or pneumonia in (1.0, -1.0)
    out["No Finding"] = nan if abnormal else 1.0  # as in MIMIC: only ever 1.0 or blank
    return out


_INDICATIONS = {
    "dyspnea": ("shortness of breath", "dyspnea", "worsening dyspnea on exertion",
                "SOB and leg swelling, eval for CHF", "increasing shortness of breath", "hypoxia"),
    "devices": ("line placement", "ETT placement", "post intubation", "evaluate NG tube placement",
                "s/p pacemaker placement", "central line placement, eval position"),
    "infection": ("fever, cough", "productive cough and fever, eval for pneumonia", "fever",
                  "cough and fever x3 days", "leukocytosis, fever"),
    "trauma": ("chest pain after fall", "trauma", "s/p fall with left chest wall pain",
               "sudden onset pleuritic chest pain", "MVC, chest pain"),
    "nodule": ("history of lung cancer, follow up nodule", "known pulmonary nodule, follow-up",
               "weight loss, smoker", "lung cancer, restaging"),
    "postop": ("post-op, hypoxia", "s/p abdominal surgery, low O2 sat", "decreased breath sounds at base"),
    "aorta": ("chest pain radiating to back", "hypertension, chest pain, eval mediastinum"),
    "generic": ("preop evaluation", "routine screening", "pre-operative evaluation", "malaise",
                "history of hypertension", "diabetes, preop", "chest pain", "weakness"),
}
_RELATED = {"effusion": "dyspnea", "edema": "dyspnea", "cardiomegaly": "dyspnea", "devices": "devices",
            "consolidation": "infection", "pneumothorax": "trauma", "lesion": "nodule",
            "atelectasis": "postop", "ecm": "aorta"}

_SIZE = ((0.22, "small"), (0.32, "moderate"), (9.0, "large"))


def _size_word(h: float) -> str:
    return next(w for lim, w in _SIZE if h < lim)


def _indication(rng, state: dict[str, int], sex: str) -> tuple[str, list[str]]:
    """(indication text, complaint groups), weakly linked to the findings.

    Each present finding brings a related complaint with probability 0.5 (at most two
    complaints are listed); a study without any gets a related-sounding one with
    probability 0.1, otherwise a generic reason.
    """
    present = [k for k in FINDINGS if state[k]]
    groups: list[str] = []
    for k in present:  # each finding: a related complaint about half the time
        if rng.random() < 0.5 and _RELATED[k] not in groups:
            groups.append(_RELATED[k])
    if len(groups) > 2:
        groups = [groups[i] for i in sorted(rng.choice(len(groups), 2, replace=False))]
    if not groups:
        groups = [_pick(rng, sorted(set(_RELATED.values()))) if rng.random() < 0.1 else "generic"]
    reason = ", ".join(_pick(rng, _INDICATIONS[g]) for g in groups)
    who = {"M": ("___M", "___-year-old man", "___ y/o male"), "F": ("___F", "___-year-old woman", "___ y/o female")}
    form = int(rng.integers(4))
    if form == 0:
        text = f"{_pick(rng, who[sex])} with {reason}"
    elif form == 1:
        text = f"{_pick(rng, who[sex])} with {reason}.  // {_pick(rng, ('eval', 'assess', 'r/o acute process'))}"
    elif form == 2:
        text = reason[0].upper() + reason[1:] + "."
    else:
        text = f"History: {_pick(rng, who[sex])} with {reason}"
    return text, groups


def _finding_sentences(rng, state, spec, neg, pneumonia, fracture_neg, lungs_clear):
    """(findings sentences, impression sentences)."""
    c = lambda *xs: _pick(rng, xs)  # noqa: E731
    fnd: list[str] = []
    imp: list[str] = []
    if state["devices"]:
        words = {
            "ett": c("Endotracheal tube terminates approximately 4 cm above the carina.",
                     "ET tube tip is in standard position above the carina."),
            "ng": c("Enteric tube courses below the diaphragm with tip in the stomach.",
                    "Nasogastric tube tip projects over the stomach."),
            "line": c(f"{'Right' if spec['devices'].get('line', (-1,))[0] == -1 else 'Left'} internal jugular"
                      " central venous catheter tip projects over the SVC.",
                      "Central venous line terminates in the lower SVC."),
            "pacer": c("Left-sided pacemaker with leads in the right atrium and right ventricle.",
                       "Dual-chamber pacemaker device with intact leads."),
        }
        fnd += [words[k] for k in spec["devices"]]
        imp.append(c("Support devices in standard position.", "Lines and tubes as described."))
    elif neg["devices"]:
        fnd.append(c("No lines or tubes are seen.", "No support devices."))

    card, ecm = state["cardiomegaly"], state["ecm"]
    if card == 0 and ecm == 0 and neg["cardiomegaly"] and neg["ecm"]:
        fnd.append(c("The cardiomediastinal silhouette is normal.",
                     "Heart size and mediastinal contours are normal."))
    else:
        if card == 1:
            s = c("The heart is moderately enlarged.", "Cardiomegaly is present.", "Severe cardiomegaly.",
                  "The cardiac silhouette is enlarged.")
            fnd.append(s)
            imp.append(c("Cardiomegaly.", "Enlarged heart."))
        elif card == -1:
            fnd.append(c("Heart size is possibly mildly enlarged.",
                         "Cardiomegaly cannot be excluded given the technique."))
        elif neg["cardiomegaly"]:
            fnd.append(c("Heart size is normal.", "No cardiomegaly.", "The heart is not enlarged."))
        if ecm == 1:
            fnd.append(c("The superior mediastinum is widened.", "Mediastinal contours are enlarged.",
                         "Widening of the mediastinum is noted."))
            imp.append("Widened mediastinum.")
        elif ecm == -1:
            fnd.append(c("Possible mediastinal widening.", "The mediastinum may be slightly widened."))
        elif neg["ecm"]:
            fnd.append(c("Mediastinal contours are normal.", "The mediastinum is not widened."))

    if state["edema"] == 1:
        fnd.append(c("Bilateral perihilar opacities compatible with pulmonary edema.",
                     "Perihilar haziness and vascular congestion consistent with interstitial edema.",
                     "Moderate pulmonary edema."))
        imp.append(c("Pulmonary edema.", "Findings consistent with pulmonary edema."))
    elif state["edema"] == -1:
        fnd.append(c("Mild vascular congestion, possible mild edema.", "Cannot exclude mild interstitial edema."))
    elif neg["edema"]:
        fnd.append(c("No pulmonary edema.", "There is no evidence of edema."))

    if state["consolidation"]:
        side = _side_word([spec["consolidation"][0]])
        zone = {-0.45: "upper", 0.0: "middle", 0.42: "lower"}
        z = min(zone, key=lambda k: abs(k - spec["consolidation"][2]))
        lobe = f"{side} {zone[z]} lobe" if not (side == "left" and zone[z] == "middle") else "lingula"
        if state["consolidation"] == 1:
            fnd.append(c(f"Dense consolidation in the {lobe}.", f"Patchy airspace consolidation in the {lobe}.",
                         f"Focal consolidation in the {lobe} with air bronchograms."))
            imp.append(f"{lobe[0].upper()}{lobe[1:]} consolidation.")
        else:
            fnd.append(c(f"Possible consolidation in the {lobe}.",
                         f"Early consolidation in the {lobe} is not excluded."))
    elif neg["consolidation"]:
        fnd.append(c("No focal consolidation.", "There is no consolidation."))

    if pneumonia == 1.0:
        imp.append(c("Findings consistent with pneumonia.", "Pneumonia."))
    elif pneumonia == -1.0:
        imp.append(c("Could represent pneumonia in the appropriate clinical setting.",
                     "Cannot exclude pneumonia.", "Possible pneumonia."))
    elif pneumonia == 0.0:
        imp.append(c("No evidence of pneumonia.", "No pneumonia."))

    if state["lesion"]:
        nod = spec["lesion"]
        side = _side_word([n[0] for n in nod])
        cm = f"{nod[0][3] * 25:.1f}"
        if state["lesion"] == 1:
            if len(nod) == 1:
                fnd.append(c(f"A {cm} cm nodule in the {side} lung.", f"Rounded {cm} cm mass in the {side} lung."))
            else:
                fnd.append(c(f"Multiple pulmonary nodules, the largest in the {side} lung.",
                             f"{'Two' if len(nod) == 2 else 'Three'} nodules are present, concerning for metastases."))
            imp.append(c("Pulmonary nodule(s), recommend CT.", "Lung mass, further evaluation with CT recommended."))
        else:
            fnd.append(c(f"Possible small nodule in the {side} lung, recommend CT.",
                         f"Questionable nodule in the {side} mid lung."))
    elif neg["lesion"]:
        fnd.append(c("No suspicious pulmonary nodules.", "No focal mass."))

    if state["atelectasis"]:
        sides = [a[0] for a in spec["atelectasis"]]
        where = "bibasilar" if len(set(sides)) == 2 else f"{_side_word(sides)} basilar"
        if state["atelectasis"] == 1:
            fnd.append(c(f"Linear {where} atelectasis.", f"Plate-like {where} atelectasis.",
                         f"There is {where} atelectasis."))
            imp.append(c("Atelectasis.", f"{where[0].upper()}{where[1:]} atelectasis."))
        else:
            fnd.append(c(f"Possible minimal {where} atelectasis.", f"Minimal {where} atelectasis is not excluded."))
    elif neg["atelectasis"]:
        fnd.append("No atelectasis.")

    if lungs_clear:
        fnd.append(c("The lungs are clear.", "Lungs are clear bilaterally."))

    eff, ptx = state["effusion"], state["pneumothorax"]
    if eff == 0 and ptx == 0 and neg["effusion"] and neg["pneumothorax"]:
        fnd.append(c("No pleural effusion or pneumothorax.", "There is no pleural effusion or pneumothorax."))
    else:
        if eff:
            sides = [e[0] for e in spec["effusion"]]
            side = _side_word(sides)
            if eff == 1:
                size = _size_word(max(e[1] for e in spec["effusion"]))
                plural = "s" if side == "bilateral" else ""
                fnd.append(c(f"{size.capitalize()} {side} pleural effusion{plural}.",
                             f"There is a {size} {side} pleural effusion{plural} "
                             "with blunting of the costophrenic angle.",
                             f"Layering {side} pleural fluid consistent with {size} effusion{plural}."))
                imp.append(f"{size.capitalize()} {side} pleural effusion{plural}.")
            else:
                fnd.append(c(f"Possible small {side} pleural effusion.",
                             f"Blunting of the {side} costophrenic angle may reflect a trace effusion."))
        elif neg["effusion"]:
            fnd.append(c("No pleural effusion.", "There is no effusion."))
        if ptx:
            side = _side_word([spec["pneumothorax"][0]])
            if ptx == 1:
                fnd.append(c(f"Large {side} apical pneumothorax.",
                             f"There is a moderate {side} pneumothorax with a visible pleural line."))
                imp.append(f"{side.capitalize()} pneumothorax.")
            else:
                fnd.append(c(f"Possible tiny {side} apical pneumothorax.",
                             f"A small {side} apical pneumothorax cannot be excluded."))
        elif neg["pneumothorax"]:
            fnd.append(c("No pneumothorax.", "The lungs are expanded without pneumothorax."))

    if fracture_neg:
        fnd.append("No displaced rib fracture.")
    if not imp or (len(imp) == 1 and state["devices"]):
        if not any(state[k] for k in PATHOLOGIES) and pneumonia not in (1.0, -1.0):
            imp.append(c("No acute cardiopulmonary process.", "No acute intrathoracic abnormality."))
    uncertain = [k for k in PATHOLOGIES if state[k] == -1]
    if uncertain and not any(state[k] == 1 for k in PATHOLOGIES):
        imp.append("Findings as above, clinical correlation recommended.")
    return fnd, imp


def _wrap(sentences: list[str]) -> str:
    text = "  ".join(sentences)
    return "\n".join(" " + line for line in textwrap.wrap(text, 76))


#: Report layouts the planner writes and their shares (real archives mix them; see reports.py).
REPORT_LAYOUTS: dict[str, float] = {
    "standard": 0.55,       # INDICATION / COMPARISON / FINDINGS / IMPRESSION headers
    "old_style": 0.10,      # an INDICATION/HISTORY header, then unheaded findings and impression paragraphs
    "inline": 0.07,         # FINDINGS: on the same line as the indication
    "no_colon": 0.06,       # headers without colons, alone on a line or followed by text
    "mixed_case": 0.07,     # mixed-case and synonym headers (Reason for examination:, CONCLUSION:)
    "wet_read": 0.05,       # a WET READ block above the final report
    "addendum": 0.05,       # an ADDENDUM after (or above) the report
    "no_indication": 0.05,  # no indication section at all
}


@dataclass
class _ReportParts:
    """What the planner put where: the layout, the indication it wrote ("" if none) and every
    radiologist sentence (view, findings, impression, wet read, addendum)."""

    layout: str
    indication: str
    radiologist: list[str]


def _layout_rng(rng: np.random.Generator) -> np.random.Generator:
    """A generator seeded from ``rng``'s current state without drawing from it, so the layout
    choices leave the study's other draws (labels, images) as they were."""
    words: list[int] = []

    def collect(x) -> None:
        if isinstance(x, dict):
            for k in sorted(x):
                collect(x[k])
        elif isinstance(x, np.ndarray):
            words.extend(abs(int(v)) for v in x.ravel())
        elif isinstance(x, (int, np.integer)):
            words.append(abs(int(x)))

    collect(rng.bit_generator.state)
    return np.random.default_rng([*words, 0x1A7])


def _write_report(lrng, layout: str, view_text: str, comparison: str, indication: str,
                  fnd: list[str], imp: list[str]) -> tuple[str, list[str]]:
    """(report text in ``layout``, the extra radiologist sentences it added: wet read, addendum)."""
    c = lambda *xs: _pick(lrng, xs)  # noqa: E731
    banner = " " * 33 + "FINAL REPORT\n"
    body = [view_text] + fnd

    def standard(ind_h="INDICATION:", cmp_h="COMPARISON:", fnd_h="FINDINGS:", imp_h="IMPRESSION:") -> str:
        return (banner + f" {ind_h}  {indication}\n \n" + f" {cmp_h}  {comparison}\n \n"
                f" {fnd_h} \n \n{_wrap(body)}\n \n {imp_h} \n \n{_wrap(imp)}\n")

    if layout == "standard":
        return standard(), []
    if layout == "old_style":
        header = c("INDICATION:", "HISTORY:", "REASON FOR EXAMINATION:", "CLINICAL HISTORY:")
        cmp = f" COMPARISON:  {comparison}\n \n" if lrng.random() < 0.4 else ""
        return banner + f" {header}  {indication}\n \n{cmp}{_wrap(body)}\n \n{_wrap(imp)}\n", []
    if layout == "inline":  # "INDICATION: ... FINDINGS: ..." on one line, sometimes without colons
        colon = ":" if lrng.random() < 0.7 else ""
        lead = [f"INDICATION{colon}  {indication}"]
        lead += [f"COMPARISON{colon}  {comparison}"] if lrng.random() < 0.4 else []
        first = " " + "  ".join(lead + [f"FINDINGS{colon}", body[0]])
        rest = f"\n{_wrap(body[1:])}" if body[1:] else ""
        return banner + f"{first}{rest}\n \n{_wrap([f'IMPRESSION{colon}'] + imp)}\n", []
    if layout == "no_colon":
        ind_h = c("INDICATION", "HISTORY", "CLINICAL HISTORY")
        tail = f" IMPRESSION\n \n{_wrap(imp)}\n" if lrng.random() < 0.5 else f"{_wrap(['IMPRESSION'] + imp)}\n"
        return (banner + f" {ind_h}  {indication}\n \n COMPARISON  {comparison}\n \n"
                f" FINDINGS\n \n{_wrap(body)}\n \n" + tail), []
    if layout == "mixed_case":
        return standard(
            c("Reason for examination:", "REASON FOR EXAMINATION:", "Clinical history:", "CLINICAL HISTORY:",
              "Clinical information:", "Indication:", "Reason for exam:"),
            c("Comparison:", "COMPARISONS:", "Comparison exam:"), c("Findings:", "FINDINGS:", "Finding:"),
            c("Impression:", "CONCLUSION:", "Conclusion:", "IMPRESSION:")), []
    if layout == "wet_read":
        wet = imp[:2] or fnd[:1]
        time = f"{int(lrng.integers(1, 13))}:{int(lrng.integers(0, 60)):02d} {c('AM', 'PM')}"
        head = c(f"WET READ: ___ ___ {time}", f"WET READ VERSION #1 ___ ___ {time}")
        return f" {head}\n{_wrap(wet)}\n \n" + standard(), list(wet)
    if layout == "addendum":
        add = [c("Findings were discussed with Dr. ___ by telephone at ___ on ___.",
                 "The images were reviewed again and the findings above are confirmed.",
                 "A repeat review of the images was performed at the request of the clinical team.")]
        add += [f"Again noted: {imp[0]}"] if imp else []
        block = f" ADDENDUM: \n \n{_wrap(add)}\n"
        return (block + " \n" + standard() if lrng.random() < 0.3 else standard() + " \n" + block), add
    if layout == "no_indication":
        return (banner + f" COMPARISON:  {comparison}\n \n FINDINGS: \n \n{_wrap(body)}\n \n"
                f" IMPRESSION: \n \n{_wrap(imp)}\n"), []
    raise ValueError(f"unknown report layout {layout!r}")


def _plan_report(rng, state, spec, view_text, comparison, indication, groups):
    labels, report, _ = _plan_report_parts(rng, state, spec, view_text, comparison, indication, groups)
    return labels, report


def _plan_report_parts(rng, state, spec, view_text, comparison, indication, groups,
                       layout: str | None = None) -> tuple[dict[str, float], str, _ReportParts]:
    """(labels, report, parts). The layout is drawn from :data:`REPORT_LAYOUTS` with a generator
    derived from ``rng`` (``rng``'s draws, hence labels and images, do not depend on it) unless given."""
    lrng = _layout_rng(rng)
    names = list(REPORT_LAYOUTS)
    drawn = names[int(lrng.choice(len(names), p=np.array(list(REPORT_LAYOUTS.values())) /
                                  sum(REPORT_LAYOUTS.values())))]
    layout = layout or drawn
    neg = {k: (state[k] == 0 and rng.random() < _P_NEG[k]) for k in FINDINGS}
    if state["consolidation"] == 1:
        pneumonia = 1.0 if ("infection" in groups and rng.random() < 0.75) else -1.0
    elif state["consolidation"] == -1:
        pneumonia = -1.0
    elif "infection" in groups and rng.random() < 0.8:
        pneumonia = 0.0
    else:
        pneumonia = float("nan")
    fracture_neg = "trauma" in groups and rng.random() < 0.5
    lungs_clear = not any(state[k] for k in PARENCHYMAL) and rng.random() < 0.5
    labels = _labels(state, neg, pneumonia, fracture_neg, lungs_clear)
    fnd, imp = _finding_sentences(rng, state, spec, neg, pneumonia, fracture_neg, lungs_clear)
    report, extra = _write_report(lrng, layout, view_text, comparison, indication, fnd, imp)
    parts = _ReportParts(layout=layout, indication="" if layout == "no_indication" else indication,
                         radiologist=[view_text, *fnd, *imp, *extra])
    return labels, report, parts


# =============================================================================== drawing


def _sig(z):
    return 0.5 + 0.5 * np.tanh(0.5 * z)


def _smooth_noise(rng, shape, cells: int) -> np.ndarray:
    """Zero-mean, unit-std value noise: a coarse random grid, smoothstep-interpolated."""
    h, w = shape
    gh, gw = max(2, int(round(cells * h / max(h, w)))) + 1, max(2, int(round(cells * w / max(h, w)))) + 1
    grid = rng.standard_normal((gh, gw)).astype(np.float32)

    def axis(n, g):
        t = (np.arange(n, dtype=np.float32) + 0.5) * (g - 1) / n
        i0 = np.minimum(t.astype(np.int64), g - 2)
        fr = t - i0
        fr = fr * fr * (3 - 2 * fr)
        return i0, fr.astype(np.float32)

    r0, fr = axis(h, gh)
    c0, fc = axis(w, gw)
    top = grid[r0][:, c0] * (1 - fc) + grid[r0][:, c0 + 1] * fc
    bot = grid[r0 + 1][:, c0] * (1 - fc) + grid[r0 + 1][:, c0 + 1] * fc
    out = top * (1 - fr)[:, None] + bot * fr[:, None]
    return (out - out.mean()) / (out.std() + 1e-6)


def _blur(img: np.ndarray) -> np.ndarray:
    """Separable binomial [1 4 6 4 1]/16 blur (about 1 pixel sigma)."""
    k = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)
    p = np.pad(img, 2, mode="edge")
    tmp = sum(k[i] * p[i : i + img.shape[0], :] for i in range(5))
    return sum(k[i] * tmp[:, i : i + img.shape[1]] for i in range(5)).astype(np.float32)


def _polyline_dist(X, Y, pts) -> np.ndarray:
    """Distance from every grid point to a polyline given as [(x, y), ...]."""
    best = np.full(X.shape, np.inf, dtype=np.float32)
    for (x0, y0), (x1, y1) in zip(pts[:-1], pts[1:]):
        dx, dy = x1 - x0, y1 - y0
        t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy + 1e-12), 0, 1)
        d = np.hypot(X - (x0 + t * dx), Y - (y0 + t * dy))
        np.minimum(best, d, out=best)
    return best


@dataclass
class _Lung:
    side: int  # -1 image left (patient right), +1 image right (patient left); lateral: +1 = posterior
    cx: float
    cy: float
    a: float
    b: float
    base: float
    dome: float
    u: np.ndarray = None  # lateral-positive local x
    v: np.ndarray = None
    f: np.ndarray = None  # 0 at centre, 1 on the outline (no diaphragm cut)
    outline: np.ndarray = None  # soft mask of the outline extended below the dome
    mask: np.ndarray = None  # soft mask of the aerated lung

    def build(self, X, Y):
        self.u = (X - self.cx) / self.a * self.side
        self.v = (Y - self.cy) / self.b
        taper = 0.62 + 0.38 * np.clip((self.v + 1.0) / 1.3, 0, 1)
        self.f = (self.u / taper) ** 2 + np.abs(self.v) ** 3
        self.outline = _sig((1 - self.f) / 0.05)
        self.mask = self.outline * _sig((self.dome_y(self.u) - Y) / 0.012)

    def dome_y(self, u):
        w = np.clip((u + 0.15) / 1.15, -1, 1)
        return self.base - self.dome * (1 - w * w)

    def point(self, u, v):
        """Image coords of a lung-local point (u lateral-positive, v in [-1, 1])."""
        taper = 0.62 + 0.38 * min(max((v + 1.0) / 1.3, 0), 1)
        return self.cx + self.side * u * self.a * taper, self.cy + v * self.b


def _device_paths(view: str, devices: dict) -> tuple[list, list]:
    """(polylines, generator boxes) for the support devices in body coordinates."""
    lines, boxes = [], []
    lateral = view in ("LATERAL", "LL")
    for kind, (side, tip) in devices.items():
        if kind == "ett":
            lines.append(([(-0.02, -1.4), (0.0, tip)] if lateral else [(0.0, -1.4), (0.0, tip)], 0.016, 0.55))
        elif kind == "ng":
            pts = ([(0.08, -1.4), (0.12, -0.2), (0.05, 0.55), (-0.2, 0.8)] if lateral
                   else [(0.03, -1.4), (0.04, -0.3), (0.07, 0.55), (0.36, 0.78)])
            lines.append((pts, 0.014, 0.5))
        elif kind == "line":
            pts = ([(0.1, -1.2), (-0.05, -0.75), (-0.12, -0.25)] if lateral
                   else [(side * 0.78, -0.98), (side * 0.45, -0.74), (side * 0.12, -0.62), (-0.03, -0.22)])
            lines.append((pts, 0.012, 0.5))
        elif kind == "pacer":
            box = (-0.6, -0.62) if lateral else (0.55, -0.7)
            boxes.append((box, 0.09, 0.065))
            leads = ([box, (-0.3, -0.5), (-0.18, -0.05), (-0.3, 0.35)] if lateral
                     else [box, (0.25, -0.62), (-0.03, -0.3), (-0.02, 0.18)])
            lines.append((leads, 0.011, 0.55))
            if not lateral:
                lines.append(([box, (0.25, -0.6), (-0.01, -0.28), (0.14, 0.42)], 0.011, 0.55))
    return lines, boxes


def _render(plan: _ImagePlan, spec: dict) -> np.ndarray:
    """Draw one radiograph; returns display values (uint16, 0..4095, brighter = denser)."""
    rng = np.random.default_rng(list(plan.seed))
    H, W = plan.rows, plan.cols
    lateral = plan.view in ("LATERAL", "LL")
    S = min(H, W)
    xs = (np.arange(W, dtype=np.float32) + 0.5 - W / 2) / (S / 2)
    ys = (np.arange(H, dtype=np.float32) + 0.5 - H / 2) / (S / 2)
    x, y = np.meshgrid(xs, ys)
    # pose: small rotation, shift, scale
    th = rng.uniform(-0.05, 0.05)
    k = rng.uniform(0.92, 1.05)
    x = x - rng.uniform(-0.04, 0.04)
    y = y - rng.uniform(-0.04, 0.04)
    X = ((np.cos(th) * x + np.sin(th) * y) / k).astype(np.float32)
    Y = ((-np.sin(th) * x + np.cos(th) * y) / k).astype(np.float32)
    jit = lambda s: rng.uniform(-s, s)  # noqa: E731
    aX = np.abs(X)

    air = rng.uniform(0.27, 0.33)
    if lateral:
        body = _sig((1 - (np.abs(X / 0.78) ** 3 + np.abs((Y - 0.2) / 1.12) ** 3)) / 0.05)
        d = 0.42 * body * (0.85 + 0.15 * (1 - X * X))
        lungs = [_Lung(1, 0.03 + jit(0.03), -0.02, 0.52 + jit(0.03), 0.66 + jit(0.03),
                       0.58 + jit(0.04), 0.2)]
    else:
        body = _sig((1 - (np.abs(X / 0.9) ** 3 + np.abs((Y - 0.2) / 1.1) ** 3)) / 0.05)
        neck = _sig((0.21 - aX) / 0.02) * _sig((-0.6 - Y) / 0.05) * (1 - body)
        d = 0.42 * body * (0.8 + 0.2 * (1 - X * X)) + 0.35 * neck
        lungs = [_Lung(s, s * (0.40 + jit(0.02)), -0.02 + jit(0.02), 0.31 + jit(0.015), 0.66 + jit(0.03),
                       (0.50 if s == -1 else 0.56) + jit(0.03), 0.13 + jit(0.02)) for s in (-1, 1)]
    for lung in lungs:
        lung.build(X, Y)
    lung_any = np.clip(sum(lung.mask for lung in lungs), 0, 1)

    # aerated lungs (darkest in the mid zones)
    for lung in lungs:
        d -= air * lung.mask * (0.9 + 0.1 * np.clip(1 - lung.v * lung.v, 0, 1))

    # abdomen below the domes
    if lateral:
        dome = lungs[0].dome_y(lungs[0].u)
    else:
        dome = np.where(X < 0, lungs[0].dome_y(lungs[0].u), lungs[1].dome_y(lungs[1].u))
    above = _sig((dome - Y) / 0.015)
    d += 0.12 * (1 - above) * body

    # mediastinum, heart, spine, trachea, bones
    hw = spec["heart_hw"] * (1.04 if plan.view == "AP" else 1.0)
    mw = spec["med_w"]
    if lateral:
        hx, hy, hh = -0.24 + 0.5 * (hw - 0.34), 0.24, 0.26 + 0.3 * (hw - 0.34)
        hwl = 0.26 + 0.9 * (hw - 0.34)
        heart = _sig((1 - (((X - hx) / hwl) ** 2 + ((Y - hy) / hh) ** 2)) / 0.08)
        d += 0.28 * heart * above
        retro = _sig((1 - (((X + 0.35) / (0.6 * mw + 0.05)) ** 2 + ((Y + 0.3) / 0.32) ** 2)) / 0.1)
        d += (0.1 + 1.2 * (mw - 0.12)) * retro
        spine = _sig((X - 0.55) / 0.015) * _sig((0.78 - X) / 0.015) * body
        d += 0.16 * spine * (0.8 + 0.2 * np.cos(2 * np.pi * Y / 0.11))
        d += 0.08 * _sig((0.03 - np.abs(X + 0.66)) / 0.01) * _sig((0.3 - Y) / 0.05) * body  # sternum
        d -= 0.1 * _sig((0.03 - np.abs(X - 0.05 + 0.07 * (Y + 1))) / 0.01) * _sig((-0.3 - Y) / 0.03)
        ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (Y - 0.35 * X) / 0.12)) ** 8
        d += 0.04 * ribs * lung_any
        hila = [(0.05, 0.0)]
    else:
        upper = _sig((Y + 0.7) / 0.04) * _sig((0.08 - Y) / 0.04)
        med = _sig((mw - np.abs(X - 0.02)) / 0.02) * upper
        d += 0.10 * _sig((1 - (((X - 0.12) / 0.09) ** 2 + ((Y + 0.42) / 0.08) ** 2)) / 0.3)  # aortic knob
        hx, hy, hh = 0.07 + 0.55 * (hw - 0.34), 0.27, 0.25 + 0.3 * (hw - 0.34)
        ct, st = np.cos(0.35), np.sin(0.35)
        Xh, Yh = (X - hx) * ct + (Y - hy) * st, -(X - hx) * st + (Y - hy) * ct
        heart = _sig((1 - ((Xh / hw) ** 2 + (Yh / hh) ** 2)) / 0.08)
        d += np.maximum(0.28 * med, 0.30 * heart * above)
        d += 0.06 * _sig((0.075 - aX) / 0.01) * body * (0.85 + 0.15 * np.cos(2 * np.pi * Y / 0.11))
        d -= 0.10 * _sig((0.035 - aX) / 0.008) * _sig((-0.35 - Y) / 0.02)
        thorax = _sig((0.86 - aX) / 0.03) * _sig((Y + 0.8) / 0.03) * _sig((0.58 - Y) / 0.05) * _sig((aX - 0.08) / 0.02)
        post = (0.5 + 0.5 * np.cos(2 * np.pi * (Y + 0.75 - 0.3 * X * X) / 0.13)) ** 8
        ant = (0.5 + 0.5 * np.cos(2 * np.pi * (Y + 0.6 + 0.3 * aX) / 0.17)) ** 6
        d += (0.07 * post + 0.035 * ant) * thorax
        for s in (-1, 1):
            dist = _polyline_dist(X, Y, [(s * 0.08, -0.70), (s * 0.35, -0.78), (s * 0.68, -0.80)])
            d += 0.13 * np.exp(-((dist / 0.026) ** 2))
        stomach = _sig((1 - (((X - 0.42) / 0.12) ** 2 + ((Y - lungs[1].base - 0.12) / 0.07) ** 2)) / 0.1)
        d -= 0.12 * stomach * body
        hila = [(s * 0.17, 0.0) for s in (-1, 1)]

    # ---------------------------------------------------------------- findings
    ptx_rim = np.zeros_like(X)
    if "pneumothorax" in spec:
        side, f0, ext = spec["pneumothorax"]
        lung = next(l for l in lungs if l.side == side) if not lateral else lungs[0]
        ycut = lung.cy + lung.b * ext
        region = lung.mask * _sig((ycut - Y) / 0.06)
        ptx_rim = _sig((lung.f - f0) / 0.025) * region
        d -= 0.07 * ptx_rim
        d += 0.05 * _sig((f0 - lung.f) / 0.03) * region  # denser collapsed lung
        d += 0.14 * np.exp(-(((lung.f - f0) / 0.022) ** 2)) * region  # visceral pleural line

    marks_gain = 1.0
    if "edema" in spec:
        amp = spec["edema"]
        for lung, (hxl, hyl) in zip(lungs, hila if not lateral else [(0.0, 0.02)]):
            r2 = ((X - hxl) / (0.3 if not lateral else 0.45)) ** 2 + ((Y - hyl) / 0.4) ** 2
            d += amp * np.exp(-r2) * lung.mask
        marks_gain = 1.0 + 4 * amp

    # vessel markings (brightest at the hila, none in a pneumothorax)
    n1 = _smooth_noise(rng, (H, W), 22)
    vessels = np.exp(-((n1 / 0.28) ** 2))
    fine = _smooth_noise(rng, (H, W), 40)
    hilar = sum(np.exp(-np.hypot(X - hx_, Y - hy_) / 0.35) for hx_, hy_ in hila)
    d += (0.045 * vessels * (0.35 + 0.65 * np.clip(hilar, 0, 1)) + 0.012 * fine) * marks_gain * lung_any * (1 - ptx_rim)

    if "effusion" in spec:
        for side, h in spec["effusion"]:
            lung = next(l for l in lungs if l.side == side) if not lateral else lungs[0]
            hh_ = h * (1.2 if (lateral and len(spec["effusion"]) == 2) else 1.0)
            lat = np.clip((lung.u + 1) / 2, 0, 1) ** 1.5
            base_frac = 0.2 if lateral else 0.55  # lateral view: fluid gathers posteriorly
            level = lung.base - hh_ * 2 * lung.b * (base_frac + (1 - base_frac) * lat)
            fluid = lung.outline * _sig((Y - level) / 0.03)
            d += fluid * (air * lung.mask + 0.06 * above)

    if "lesion" in spec:
        for side, uu, vv, r, amp in spec["lesion"]:
            lung = next(l for l in lungs if l.side == side) if not lateral else lungs[0]
            px, py = lung.point(uu * (0.6 if lateral else 1.0), vv)
            ang = np.arctan2(Y - py, X - px)
            rr = r * (1 + 0.08 * np.sin(3 * ang + 7 * r) + 0.05 * np.cos(5 * ang))
            dist = np.hypot(X - px, Y - py)
            d += amp * _sig((rr - dist) / (0.12 * r)) * (0.8 + 0.2 * np.clip(1 - dist / r, 0, 1))

    if "consolidation" in spec:
        side, uu, vv, size, amp = spec["consolidation"]
        lung = next(l for l in lungs if l.side == side) if not lateral else lungs[0]
        px, py = lung.point(uu * (0.5 if lateral else 1.0), vv)
        rx, ry = size * lung.a * (0.8 if lateral else 1.0), size * lung.b * 0.55
        blob = _sig((1 - (((X - px) / rx) ** 2 + ((Y - py) / ry) ** 2)) / 0.3)
        patch = blob * np.clip(0.85 + 0.5 * _smooth_noise(rng, (H, W), 14), 0, 1) * lung.mask
        bronch = np.exp(-((_smooth_noise(rng, (H, W), 30) / 0.2) ** 2))
        d += amp * patch * (1 - 0.3 * bronch)

    if "atelectasis" in spec:
        for side, uu, vv, ang, length, thick, amp in spec["atelectasis"]:
            lung = next(l for l in lungs if l.side == side) if not lateral else lungs[0]
            px, py = lung.point(uu, vv)
            ca, sa = np.cos(ang), np.sin(ang)
            along = (X - px) * ca + (Y - py) * sa
            across = -(X - px) * sa + (Y - py) * ca
            half = length * lung.a * (1.4 if lateral else 1.0)
            band = np.exp(-((across / thick) ** 2)) * _sig((half - np.abs(along)) / 0.03)
            d += amp * band * np.clip(lung.mask * 1.5, 0, 1)

    if "devices" in spec:
        lines, boxes = _device_paths(plan.view, spec["devices"])
        for pts, width, amp in lines:
            dist = _polyline_dist(X, Y, pts)
            d += amp * np.exp(-((dist / width) ** 2))
        for (bx, by), bw, bh in boxes:
            d += 0.9 * _sig((bw - np.abs(X - bx)) / 0.008) * _sig((bh - np.abs(Y - by)) / 0.008)

    # ---------------------------------------------------------------- exposure & noise
    d = _blur(np.maximum(d, 0))
    gamma = rng.uniform(0.85, 1.15)
    gain = rng.uniform(0.6, 0.75)
    pedestal = rng.uniform(0.02, 0.08)
    val = pedestal + gain * d**gamma
    val += 0.01 * _smooth_noise(rng, (H, W), 6)
    val = val * 4095 + rng.normal(0, rng.uniform(6, 14), (H, W))
    return np.clip(np.rint(val), 0, 4095).astype(np.uint16)


# =============================================================================== DICOM


def _rle_compress(ds: Dataset, arr: np.ndarray) -> None:
    try:
        ds.compress(RLELossless, arr, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    except RuntimeError:  # plugin missing: pydicom's own encoder gives the same bytes
        ds.compress(RLELossless, arr, encoding_plugin="pydicom", generate_instance_uid=False)


def _dicom_bytes(study: _StudyPlan, img: _ImagePlan, display: np.ndarray) -> bytes:
    stored = 4095 - display if img.monochrome1 else display
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = img.sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MEDFUSE_SYNTH"
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = img.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = study.study_time
    ds.AccessionNumber = study.accession
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "SYNTHRAY"
    ds.InstitutionName = study.institution
    ds.ReferringPhysicianName = study.physician
    ds.StationName = study.station
    ds.StudyDescription = study.procedure
    ds.SeriesDescription = {"PA": "CHEST PA", "AP": "CHEST AP PORTABLE"}.get(img.view, "CHEST LATERAL")
    ds.PatientName = study.patient_name
    ds.PatientID = f"{study.subject_id:08d}"
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = img.view
    ds.StudyInstanceUID = study.study_uid
    ds.SeriesInstanceUID = img.series_uid
    ds.StudyID = str(study.study_id)
    ds.SeriesNumber = img.instance
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["A", "F"] if img.view in ("LATERAL", "LL") else ["L", "F"]
    spacing = f"{350.0 / min(img.rows, img.cols):.4f}"
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if img.monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = img.rows, img.cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    slope, intercept = img.rescale or (1.0, 0.0)
    if img.rescale:
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "US"
    if img.window:
        lo, hi = np.percentile(stored, [1, 99])
        ds.WindowCenter = f"{slope * (lo + hi) / 2 + intercept:.1f}"
        ds.WindowWidth = f"{slope * (hi - lo) * 1.15 + 1:.1f}"
    ds.LossyImageCompression = "00"
    ds.BurnedInAnnotation = "NO"
    stored = np.ascontiguousarray(stored, dtype=np.uint16)
    if img.rle:
        _rle_compress(ds, stored)
    else:
        ds.PixelData = stored.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# =============================================================================== corpus


def _plan_corpus(n_studies: int, seed: int) -> list[_StudyPlan]:
    rng = np.random.default_rng([seed, 1])
    ids = _Ids(np.random.default_rng([seed, 2]))
    studies: list[_StudyPlan] = []
    image_index = 0
    patients: list[int] = []
    while len(studies) < n_studies:
        subject = ids.subject()
        patients.append(subject)
        sex = "M" if rng.random() < 0.5 else "F"
        name = f"{_pick(rng, _LAST)}^{_pick(rng, _FIRST_M if sex == 'M' else _FIRST_F)}"
        birth_year = int(rng.integers(2090, 2160))
        birth = f"{birth_year}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"
        n = min(int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), n_studies - len(studies))
        day = int(rng.integers(0, 365 * 30))
        for j in range(n):
            day += int(rng.integers(1, 400)) if j else 0
            date = np.datetime64("2150-01-01") + np.timedelta64(day, "D")
            study_date = str(date).replace("-", "")
            hh, mm, ss, ms = (int(rng.integers(0, lim)) for lim in (24, 60, 60, 1000))
            study_time = f"{hh:02d}{mm:02d}{ss:02d}.{ms:03d}"
            state = _sample_state(rng)
            spec = _sample_spec(rng, state)
            portable = state["devices"] == 1 or rng.random() < 0.25
            view = "AP" if portable else "PA"
            has_lateral = view == "PA" and rng.random() < 0.5
            if view == "AP":
                procedure, view_text = "CHEST (PORTABLE AP)", _pick(rng, (
                    "Portable semi-upright AP view of the chest.", "Single frontal view of the chest was obtained."))
            elif has_lateral:
                procedure, view_text = "CHEST (PA AND LAT)", _pick(rng, (
                    "PA and lateral views of the chest provided.", "Frontal and lateral radiographs of the chest."))
            else:
                procedure, view_text = "CHEST (PA)", "Single PA view of the chest."
            comparison = ("None." if j == 0 and rng.random() < 0.7
                          else _pick(rng, ("___.", "Chest radiograph ___.", "Prior study from ___.")))
            indication, groups = _indication(rng, state, sex)
            labels, report = _plan_report(rng, state, spec, view_text, comparison, indication, groups)
            study = _StudyPlan(
                subject_id=subject, study_id=ids.study(), sex=sex, patient_name=name, birth_date=birth,
                study_date=study_date, study_time=study_time, accession=f"{int(rng.integers(10**7, 10**8))}",
                study_uid=ids.uid(), institution=_pick(rng, _INSTITUTIONS), physician=_pick(rng, _PHYSICIANS),
                station=_pick(rng, _STATIONS), state=state, spec=spec, labels=labels, report=report,
                procedure=procedure,
            )
            views = [view] + ([_pick(rng, ("LATERAL", "LATERAL", "LL"))] if has_lateral else [])
            for inst, v in enumerate(views, start=1):
                side = int(rng.integers(12, 23)) * 16  # 192 .. 352
                aspect = _pick(rng, (1.0, 1.0, 1.1, 1.2, 1.25, 0.9, 0.8))
                rows, cols = min(384, max(192, int(round(side * aspect / 16)) * 16)), side
                study.images.append(_ImagePlan(
                    dicom_id=ids.dicom_id(), view=v, rows=rows, cols=cols,
                    monochrome1=rng.random() < 0.3,
                    rescale=(_pick(rng, ((2.0, -1024.0), (0.5, 0.0), (1.0, -1024.0), (4.0, 100.0)))
                             if rng.random() < 0.3 else None),
                    rle=rng.random() < 0.3, window=rng.random() < 0.4,
                    series_uid=ids.uid(), sop_uid=ids.uid(), seed=(seed, 3, image_index), instance=inst,
                ))
                image_index += 1
            studies.append(study)
    _assign_splits(studies, patients, seed)
    return studies


def _assign_splits(studies: list[_StudyPlan], patients: list[int], seed: int) -> None:
    """~80/10/10 train/validate/test by patient (each patient in exactly one split)."""
    order = list(np.random.default_rng([seed, 4]).permutation(len(patients)))
    n = len(patients)
    n_val = n_test = max(1, int(round(0.1 * n))) if n >= 3 else 0
    split_of = {}
    for rank, idx in enumerate(order):
        split_of[patients[idx]] = "test" if rank < n_test else ("validate" if rank < n_test + n_val else "train")
    for s in studies:
        s.split = split_of[s.subject_id]


def _fmt_label(v: float) -> str:
    return "" if np.isnan(v) else f"{v:.1f}"


def _write_csv(path: Path, header, rows) -> None:
    """Write a table; gzipped if ``path`` ends in .gz (mtime 0, no name: same rows, same bytes)."""
    with open(path, "wb") as raw:
        gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.suffix == ".gz" else None
        with io.TextIOWrapper(gz or raw, encoding="utf-8", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)


SYNTHETIC_MARKER = "medfuse-synthetic.json"


def generate_corpus(
    out_dir, n_studies: int = 200, seed: int = 0, progress: Progress = None, workers: int | None = None,
    tables: str = "gz",
) -> dict:
    """Write a synthetic MIMIC-CXR-layout corpus of ``n_studies`` studies to ``out_dir``.

    Existing files with the same names are overwritten (use an empty directory).
    ``progress(n_done, n_total)`` is called after each study, from the calling thread.
    ``workers`` rendering threads (default: up to 2); the output does not depend on it.
    ``tables``: "gz" writes the tables as ``mimic-cxr-2.0.0-*.csv.gz`` (as released), "csv"
    as plain ``.csv``; a table of the other kind left in ``out_dir`` is removed.
    Returns a summary:
    ``n_studies``, ``n_images``, ``n_patients``, ``n_lateral``, ``splits`` (studies per
    split), ``positives`` (label -> count of 1.0), ``encodings`` (images per variant),
    ``bytes`` (total size written).
    """
    if n_studies < 1:
        raise ValueError("n_studies must be >= 1")
    if int(seed) < 0:
        raise ValueError("seed must be a non-negative integer")
    if tables not in TABLE_SUFFIX:
        raise ValueError(f"tables must be one of {sorted(TABLE_SUFFIX)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    studies = _plan_corpus(int(n_studies), int(seed))
    total_bytes = 0
    enc = {"MONOCHROME1": 0, "RLE": 0, "rescale": 0, "window": 0}

    def build(st: _StudyPlan) -> list[bytes]:
        return [_dicom_bytes(st, img, _render(img, st.spec)) for img in st.images]

    # Every image has its own seeded RNG, so rendering in threads (numpy releases the GIL)
    # is as deterministic as rendering in order; files are written in study order.
    n_workers = max(1, int(workers if workers is not None else min(2, os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=n_workers) as pool:
        window = 4 * n_workers
        pending = [pool.submit(build, st) for st in studies[:window]]
        for i, st in enumerate(studies):
            blobs = pending[i].result()
            pending[i] = None  # release the bytes once written
            if i + window < len(studies):
                pending.append(pool.submit(build, studies[i + window]))
            sub = f"p{st.subject_id:08d}"
            pdir = out / "files" / sub[:3] / sub
            sdir = pdir / f"s{st.study_id}"
            sdir.mkdir(parents=True, exist_ok=True)
            report = st.report.encode()
            (pdir / f"s{st.study_id}.txt").write_bytes(report)
            total_bytes += len(report)
            for img, data in zip(st.images, blobs):
                (sdir / f"{img.dicom_id}.dcm").write_bytes(data)
                total_bytes += len(data)
                enc["MONOCHROME1"] += img.monochrome1
                enc["RLE"] += img.rle
                enc["rescale"] += img.rescale is not None
                enc["window"] += img.window
            if progress is not None:
                progress(i + 1, len(studies))

    order = sorted(studies, key=lambda s: (s.subject_id, s.study_id))
    suffix = TABLE_SUFFIX[tables]
    for stem in (CHEXPERT_TABLE, SPLIT_TABLE, METADATA_TABLE):  # a stale table of the other kind
        for other in TABLE_SUFFIX.values():
            if other != suffix:
                (out / f"{stem}{other}").unlink(missing_ok=True)
    _write_csv(out / f"{CHEXPERT_TABLE}{suffix}", ("subject_id", "study_id", *CHEXPERT_LABELS),
               [(s.subject_id, s.study_id, *(_fmt_label(s.labels[n]) for n in CHEXPERT_LABELS)) for s in order])
    _write_csv(out / f"{SPLIT_TABLE}{suffix}", ("dicom_id", "study_id", "subject_id", "split"),
               [(im.dicom_id, s.study_id, s.subject_id, s.split) for s in order for im in s.images])
    view_meaning = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral"}
    _write_csv(out / f"{METADATA_TABLE}{suffix}", METADATA_COLUMNS,
               [(im.dicom_id, s.subject_id, s.study_id, s.procedure, im.view, im.rows, im.cols,
                 s.study_date, s.study_time, s.procedure, view_meaning[im.view],
                 "Recumbent" if im.view == "AP" else "Erect") for s in order for im in s.images])
    for stem in (CHEXPERT_TABLE, SPLIT_TABLE, METADATA_TABLE):
        total_bytes += (out / f"{stem}{suffix}").stat().st_size

    splits = {k: sum(s.split == k for s in studies) for k in ("train", "validate", "test")}
    # Marks the corpus as synthetic: only such a folder may be ingested with the public deid key.
    (out / SYNTHETIC_MARKER).write_text(json.dumps({"generator": "medfuse.synth", "seed": int(seed),
                                                    "n_studies": len(studies)}) + "\n")
    total_bytes += (out / SYNTHETIC_MARKER).stat().st_size
    return {
        "n_studies": len(studies),
        "n_images": sum(len(s.images) for s in studies),
        "n_patients": len({s.subject_id for s in studies}),
        "n_lateral": sum(im.view in ("LATERAL", "LL") for s in studies for im in s.images),
        "splits": splits,
        "positives": {n: int(sum(s.labels[n] == 1.0 for s in studies)) for n in CHEXPERT_LABELS},
        "encodings": enc,
        "bytes": total_bytes,
    }
