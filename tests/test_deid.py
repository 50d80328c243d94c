"""De-identification: keyed pseudonyms, date shifts, header allow-list, report scrubbing, keys."""

from __future__ import annotations

import json
import logging
import pickle
import re
import stat
import warnings

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian

from medfuse_core.data import deid
from medfuse_core.data.deid import (
    ANNEX_E_ATTRIBUTES,
    HEADER_ALLOW_LIST,
    HEADER_FIELDS,
    SCRUB_RULES,
    DeidKeyError,
    Pseudonymizer,
    date_shift_days,
    deidentify,
    deidentify_header,
    generate_key_file,
    has_burned_in_annotation,
    identifiers_from_header,
    load_key,
    names_from_header,
    pseudonymize_record_ids,
    scrub_report,
    shift_date,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(1, 33))
SECRET_HEX = "5eC7e7" + "ab" * 29  # 64 hex characters
DX = UID("1.2.840.10008.5.1.4.1.1.1.1")


@pytest.fixture()
def ps() -> Pseudonymizer:
    return Pseudonymizer(KEY_A)


def scrub(text, names=(), **kw):
    return scrub_report(text, names, **kw)[0]


# =============================================================================== pseudonyms


def test_pseudonyms_are_stable_short_and_typed(ps):
    assert ps.pseudonym("patient", "10000032") == Pseudonymizer(KEY_A).pseudonym("patient", "10000032")
    assert re.fullmatch(r"P-[0-9A-F]{16}", ps.pseudonym("patient", "10000032"))
    for kind, prefix in (("study", "S"), ("accession", "A"), ("record", "R")):
        assert re.fullmatch(rf"{prefix}-[0-9A-F]{{16}}", ps.pseudonym(kind, "10000032"))
    # whitespace around a value does not matter, leading zeros do
    assert ps.pseudonym("patient", " 10000032 ") == ps.pseudonym("patient", "10000032")
    assert ps.pseudonym("patient", "010000032") != ps.pseudonym("patient", "10000032")
    assert ps.pseudonym("study", 50000123) == ps.pseudonym("study", "50000123")


def test_pseudonyms_depend_on_key_kind_and_value(ps):
    other = Pseudonymizer(KEY_B)
    assert ps.pseudonym("patient", "123") != other.pseudonym("patient", "123")
    hexes = {ps.pseudonym(k, "123")[2:] for k in ("patient", "study", "accession", "record")}
    assert len(hexes) == 4
    assert len({ps.pseudonym("patient", str(i)) for i in range(2000)}) == 2000


def test_pseudonym_errors_do_not_echo_values(ps):
    with pytest.raises(ValueError) as err:
        ps.pseudonym("CANARY-KIND-QZX", "CANARY-VALUE-QZX")
    assert "CANARY" not in str(err.value)
    for empty in ("", "   ", None):
        with pytest.raises(ValueError):
            ps.pseudonym("patient", empty)


def test_uid_pseudonyms_are_valid_keyed_uids(ps):
    uid = ps.uid("1.2.826.0.1.3680043.8.498.1.2")
    assert uid.startswith("2.25.") and len(uid) <= 64 and UID(uid).is_valid
    assert uid == Pseudonymizer(KEY_A).uid("1.2.826.0.1.3680043.8.498.1.2")
    assert uid != Pseudonymizer(KEY_B).uid("1.2.826.0.1.3680043.8.498.1.2")


def test_pseudonymizer_never_shows_its_key_and_pickles(ps):
    for text in (repr(ps), str(ps)):
        assert KEY_A.hex() not in text and ps.key_id in text
    clone = pickle.loads(pickle.dumps(ps))
    assert clone.pseudonym("patient", "x1") == ps.pseudonym("patient", "x1")
    assert ps.key_id != Pseudonymizer(KEY_B).key_id


def test_synthetic_pseudonymizer_is_fixed_and_flagged():
    a, b = Pseudonymizer.for_synthetic_data(), Pseudonymizer.for_synthetic_data()
    assert a.synthetic and not Pseudonymizer(KEY_A).synthetic
    assert a.pseudonym("patient", "1") == b.pseudonym("patient", "1")
    assert "synthetic" in repr(a)


def test_short_key_is_refused():
    with pytest.raises(DeidKeyError):
        Pseudonymizer(b"short")


def test_record_ids_are_pseudonymised_consistently(ps):
    rec = {"record_id": "d1", "study_id": "50000123", "patient_id": "10000032"}
    out = pseudonymize_record_ids(rec, ps)
    assert out == {"record_id": ps.pseudonym("record", "d1"), "study_id": ps.pseudonym("study", "50000123"),
                   "patient_id": ps.pseudonym("patient", "10000032")}
    assert pseudonymize_record_ids({"record_id": "d1"}, ps)["patient_id"] == ""


# =============================================================================== dates


def test_date_shift_is_per_patient_and_in_range(ps):
    shifts = [date_shift_days(ps, f"patient-{i}") for i in range(400)]
    assert all(-365 <= s <= -1 for s in shifts)
    # different patients mostly differ (400 draws from 365 values: ~243 distinct expected)
    assert len(set(shifts)) > 200
    assert sum(a != b for a, b in zip(shifts[::2], shifts[1::2])) >= 190
    assert date_shift_days(ps, "patient-7") == shifts[7] == ps.date_shift_days("patient-7")
    other = [date_shift_days(Pseudonymizer(KEY_B), f"patient-{i}") for i in range(50)]
    assert sum(a != b for a, b in zip(shifts, other)) >= 45  # the shift depends on the key


def test_shift_date():
    assert shift_date("20190704", -3) == "20190701"
    assert shift_date("20200301", -1) == "20200229"  # leap year
    assert shift_date("20190101", -1) == "20181231"
    assert shift_date("2019.07.04", 0) == "20190704"  # old ACR-NEMA form
    for bad in ("CANARY-DATE-QZX", "20191301", "2019074", ""):
        with pytest.raises(ValueError) as err:
            shift_date(bad, -1)
        assert "CANARY" not in str(err.value)


# =============================================================================== header


def _canary_value(keyword: str, vr: str, i: int):
    """A value valid for the VR that is unique and easy to find in the output (or None)."""
    token = f"KQ{i:03d}X"  # K, Q and X never occur in hex pseudonyms or 2.25 UIDs
    if vr == "PN":
        return f"CANARY{token}^JOHN^Q", token
    if vr in ("CS", "SH", "AE"):
        return f"CANARY {token}", token
    if vr in ("LO", "LT", "ST", "UT", "UC"):
        return f"canary value {token}", token
    if vr == "DA":
        value = f"{1801 + 3 * i}0701"  # years 3 apart: a shifted date never equals another canary
        return value, value
    if vr == "TM":
        value = f"0{i % 10}1234.{700000 + i}"
        return value, value
    if vr == "DT":
        value = f"{1801 + 3 * i}0701121314"
        return value, value
    if vr == "UI":
        value = f"1.2.826.0.1.3680043.8.498.9{i:03d}7"
        return value, value
    if vr == "AS":
        return "093Y", "093Y"
    if vr == "DS":
        value = f"1.{i:03d}987"
        return value, value
    if vr == "US":
        return 4, None  # a small number cannot be told apart from Rows etc.
    if vr == "SQ":
        item = Dataset()
        item.PatientID = f"CANARY-SQ-{token}"
        item.CodeMeaning = f"canary meaning {token}"
        return [item], token
    raise AssertionError(f"no canary for VR {vr}")


def canary_dataset() -> tuple[Dataset, list[str]]:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.88887"
    canaries = ["1.2.826.0.1.3680043.8.498.88887"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, keyword in enumerate(ANNEX_E_ATTRIBUTES):
            tag = tag_for_keyword(keyword)
            vr = dictionary_VR(tag)
            value, needle = _canary_value(keyword, vr, i)
            ds.add_new(tag, vr, value)
            if needle:
                canaries.append(needle)
        # a private block
        ds.add_new(0x00090010, "LO", "CANARY CREATOR KQ900X")
        ds.add_new(0x00091001, "LO", "canary private KQ901X")
        ds.add_new(0x00091002, "PN", "PRIVATE^KQ902X")
        canaries += ["KQ900X", "KQ901X", "KQ902X"]
        # allow-listed attributes with ordinary values
        ds.Modality = "DX"
        ds.ViewPosition = "PA"
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.Rows, ds.Columns = 2048, 1760
        ds.SamplesPerPixel, ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation = 1, 16, 12, 0
        ds.ImagerPixelSpacing = ["0.139", "0.139"]
        ds.BodyPartExamined = "CHEST"
        ds.SOPClassUID = DX
        ds.Manufacturer = "SYNTHRAY"
        ds.BurnedInAnnotation = "NO"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PatientSex = "F"  # the canary value would be dropped anyway; check a real one is kept
    return ds, canaries


def test_annex_e_list_is_large_and_made_of_real_keywords():
    assert len(ANNEX_E_ATTRIBUTES) >= 40 and len(set(ANNEX_E_ATTRIBUTES)) == len(ANNEX_E_ATTRIBUTES)
    assert all(tag_for_keyword(k) is not None for k in ANNEX_E_ATTRIBUTES)
    for k in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "PatientAddress",
              "ReferringPhysicianName", "InstitutionName", "InstitutionAddress", "AccessionNumber",
              "StudyID", "StationName", "OperatorsName", "PerformingPhysicianName", "RequestingPhysician",
              "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        assert k in ANNEX_E_ATTRIBUTES
    # Annex E attributes on the allow-list are only kept validated / derived / shifted
    assert set(ANNEX_E_ATTRIBUTES) & set(HEADER_ALLOW_LIST) == {"PatientSex", "PatientAge", "StudyDate"}
    assert all(reason.strip() for reason in HEADER_ALLOW_LIST.values())
    assert all(tag_for_keyword(k) is not None for k in HEADER_ALLOW_LIST)


def test_header_keeps_only_the_allow_list_and_no_canary(ps):
    ds, canaries = canary_dataset()
    assert len(canaries) >= 25
    out = deidentify_header(ds, ps)
    assert tuple(out) == HEADER_FIELDS
    dump = json.dumps(out)
    leaked = [c for c in canaries if c in dump]
    assert not leaked
    assert "CANARY" not in dump.upper()
    assert not ({"PatientName", "PatientBirthDate", "InstitutionName"} & set(out))


def test_header_values_pseudonyms_and_markers(ps):
    ds, _ = canary_dataset()
    out = deidentify_header(ds, ps)
    assert out["PatientIdentityRemoved"] == "YES"
    assert "Annex E" in out["DeidentificationMethod"]
    assert "113100" in out["DeidentificationMethodCodeSequence"]
    assert out["Modality"] == "DX" and out["ViewPosition"] == "PA"
    assert out["PhotometricInterpretation"] == "MONOCHROME1"
    assert (out["Rows"], out["Columns"], out["BitsStored"]) == (2048, 1760, 12)
    assert out["ImagerPixelSpacing"] == [0.139, 0.139] and out["PixelSpacing"] is None
    assert out["NumberOfFrames"] == 1 and out["BodyPartExamined"] == "CHEST"
    assert out["PatientSex"] == "F" and out["PatientAge"] == 90  # "093Y" capped
    assert out["TransferSyntaxUID"] == ExplicitVRLittleEndian and out["SOPClassUID"] == DX
    assert out["Manufacturer"] == "SYNTHRAY" and out["BurnedInAnnotation"] == "NO"
    raw_pid, raw_date = str(ds.PatientID), str(ds.StudyDate)
    assert out["PatientID"] == ps.pseudonym("patient", raw_pid)
    assert out["StudyID"] == ps.pseudonym("study", str(ds.StudyID))
    assert out["AccessionNumber"] == ps.pseudonym("accession", str(ds.AccessionNumber))
    assert out["StudyInstanceUID"] == ps.uid(str(ds.StudyInstanceUID))
    assert out["StudyDate"] == shift_date(raw_date, date_shift_days(ps, raw_pid)) != raw_date
    json.dumps(out)  # plain types only


def test_header_uses_the_source_ids_when_given(ps):
    ds, _ = canary_dataset()
    out = deidentify_header(ds, ps, patient_id="10000032", study_id="50000123")
    assert out["PatientID"] == ps.pseudonym("patient", "10000032")
    assert out["StudyID"] == ps.pseudonym("study", "50000123")
    assert out["StudyDate"] == shift_date(str(ds.StudyDate), date_shift_days(ps, "10000032"))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom complains when the test sets odd values
def test_header_age_from_dates_and_odd_values_dropped(ps):
    ds = Dataset()
    ds.PatientID = "p1"
    ds.PatientBirthDate = "19500705"
    ds.StudyDate = "20190704"
    ds.Modality = "dx"  # lower case is normalised
    ds.ViewPosition = "NOT A VALID CODE STRING!"
    ds.PatientSex = "X"
    ds.SOPClassUID = "1.2.826.0.1.3680043.8.498.5"  # not a registered SOP class: could be anything
    out = deidentify_header(ds, ps)
    assert out["PatientAge"] == 68 and out["Modality"] == "DX"
    assert out["ViewPosition"] is None and out["PatientSex"] is None and out["SOPClassUID"] is None
    ds.PatientBirthDate = "19200101"
    assert deidentify_header(ds, ps)["PatientAge"] == 90
    ds.PatientBirthDate = "21000101"  # after the study: no age rather than a negative one
    assert deidentify_header(ds, ps)["PatientAge"] is None
    empty = deidentify_header(Dataset(), ps)
    assert tuple(empty) == HEADER_FIELDS and empty["PatientID"] is None and empty["StudyDate"] is None
    assert empty["PatientIdentityRemoved"] == "YES"


def test_header_reading_emits_no_value_in_warnings_or_logs(ps, caplog, recwarn):
    ds = Dataset()  # malformed values as read from a file: converted (and complained about) on access
    for tag, vr, raw in ((0x00080020, "DA", b"CANARY-DA-KQ1X"), (0x00101010, "AS", b"CANARY-AS-KQ2X"),
                         (0x00280030, "DS", b"CANARY-DS-KQ3X\\1"), (0x00100040, "CS", b"canary-cs-kq4x"),
                         (0x00100010, "PN", b"CANARY^PN^KQ5X")):
        ds[tag] = RawDataElement(BaseTag(tag), vr, len(raw), raw, 0, False, True)
    with caplog.at_level(logging.DEBUG):
        out = deidentify_header(ds, ps)
        names_from_header(ds)
        has_burned_in_annotation(ds)
    text = caplog.text + " ".join(str(w.message) for w in recwarn) + json.dumps(out)
    assert "CANARY" not in text.upper()
    assert out["StudyDate"] is None and out["PatientAge"] is None and out["PixelSpacing"] is None


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_burned_in_annotation_flag():
    ds = Dataset()
    assert not has_burned_in_annotation(ds)
    ds.BurnedInAnnotation = "NO"
    assert not has_burned_in_annotation(ds)
    ds.BurnedInAnnotation = "YES"
    assert has_burned_in_annotation(ds)
    ds.BurnedInAnnotation = "yes "
    assert has_burned_in_annotation(ds)


def test_names_and_identifiers_from_header():
    ds = Dataset()
    ds.PatientName = "DOE^JOHN^Q"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.OperatorsName = ["KILDARE^JAMES", "DOE^JOHN^Q"]
    ds.PatientID = "10000032"
    ds.AccessionNumber = "87654321"
    item = Dataset()
    item.PerformingPhysicianName = "QUINN^MICHAELA"
    ds.RequestAttributesSequence = [item]
    assert set(names_from_header(ds)) == {"DOE^JOHN^Q", "HOUSE^GREGORY", "KILDARE^JAMES", "QUINN^MICHAELA"}
    assert len(names_from_header(ds)) == 4
    assert set(identifiers_from_header(ds)) == {("patient", "10000032"), ("accession", "87654321")}


# =============================================================================== reports

PATIENT = ["DOE^JOHN^QUINCY"]


@pytest.mark.parametrize("text", [
    "John Doe", "JOHN DOE", "john doe", "Doe, John", "DOE, JOHN", "doe john", "Doe John", "J. Doe",
    "John Q. Doe", "John Quincy Doe", "Doe", "DOE", "John", "Quincy",
])
def test_header_names_in_any_order_and_case(text):
    out, audit = scrub_report(f"Patient {text} was seen.", PATIENT)
    assert out == "Patient [NAME] was seen."
    assert audit["name"] == 1


def test_names_are_whole_words_and_keep_their_context():
    assert scrub("Johnny and Doerr, Johnson; Doe's film.", PATIENT) == "Johnny and Doerr, Johnson; [NAME]'s film."
    assert scrub("seen by Doe, J. today", PATIENT) == "seen by [NAME] today"
    out, audit = scrub_report("Dr. House saw John. Gregory called.", ["DOE^JOHN", "HOUSE^GREGORY"])
    assert out == "Dr. [NAME] saw [NAME]. [NAME] called." and audit["name"] == 3


def test_short_and_ordinary_word_names_need_more_context():
    names = ["MASS^CLEAR", "NG^AL"]  # every part is short or an ordinary word
    text = "The lungs are clear. No mass. No clear mass. NG tube in place. Al was here. Clear Ng."
    assert scrub(text, names) == text
    out, audit = scrub_report("Mr. Mass. Clear Mass. Al Ng. NG, AL. Dr. Clear Mass.", names)
    assert out == "Mr. [NAME]. [NAME]. [NAME]. [NAME]. Dr. [NAME]." and audit["name"] == 5
    assert scrub("Seen by Mass, Clear Ng and Al.", names) == "Seen by [NAME] and Al."


@pytest.mark.parametrize("text,expected", [
    ("Discussed with Dr. Smith.", "Discussed with Dr. [NAME]."),
    ("Discussed with Dr Jane Smith.", "Discussed with Dr [NAME]."),
    ("Discussed with Doctor Smith.", "Discussed with Doctor [NAME]."),
    ("Nurse Jones was informed.", "Nurse [NAME] was informed."),
    ("Mr. Garcia, Mrs. Okafor, Ms. Rossi, Prof. Tanaka.", "Mr. [NAME], Mrs. [NAME], Ms. [NAME], Prof. [NAME]."),
    ("DR. SMITH WAS NOTIFIED.", "DR. [NAME] WAS NOTIFIED."),
    ("Dr. J. Smith agreed.", "Dr. [NAME] agreed."),
    ("Dr. Özdemir and Mr. O'Brien.", "Dr. [NAME] and Mr. [NAME]."),
    ("MR. JONES, MRS. JONES.", "MR. [NAME], MRS. [NAME]."),
])
def test_titled_names(text, expected):
    out, audit = scrub_report(text)
    assert out == expected
    assert audit["titled_name"] == expected.count("[NAME]")


@pytest.mark.parametrize("text", [
    "2019-07-04", "07/04/2019", "7/4/19", "04.07.2019", "13/07/2019", "July 4, 2019", "4 July 2019",
    "Jul 4", "Jul. 4th, 2019", "4th of July", "July 2019", "07/2019", "20190704", "2150-03-12",
])
def test_dates(text):
    out, audit = scrub_report(f"Compared with {text} study.")
    assert out == "Compared with [DATE] study."
    assert audit["date"] == 1


@pytest.mark.parametrize("text", ["14:32", "2:32 pm", "2:32PM", "14:32:10", "5 p.m.", "1430 hours"])
def test_times(text):
    out, audit = scrub_report(f"Called at {text} today.")
    assert out == "Called at [TIME] today." and audit["time"] == 1


@pytest.mark.parametrize("text", [
    "(617) 555-0199", "617-555-0199", "617.555.0199", "+1 617 555 0199", "1-617-555-0199",
    "617-555-0199 ext. 123", "617-555-0199 x1234", "555-0199", "+44 20 7946 0958",
])
def test_phones(text):
    out, audit = scrub_report(f"Call {text} now.")
    assert out == "Call [PHONE] now." and audit["phone"] == 1


def test_pager_and_email():
    out, audit = scrub_report("Paged pager 41234; results to john.doe@example.org or X_Y+z@mail.hosp.co.uk.")
    assert out == "Paged pager [PHONE]; results to [EMAIL] or [EMAIL]."
    assert audit["phone"] == 1 and audit["email"] == 2


@pytest.mark.parametrize("text,expected", [
    ("MRN 12345678", "MRN [ID]"), ("MRN: 0012345", "MRN: [ID]"), ("MR# A1234567", "MR# [ID]"),
    ("Accession 98765432", "Accession [ID]"), ("accession no. 12345-678", "accession no. [ID]"),
    ("acc: 5551212X", "acc: [ID]"), ("record #12345", "record #[ID]"), ("ID 99887766", "ID [ID]"),
    ("#1234567", "#[ID]"), ("order 1234567", "order [ID]"), ("SSN 123-45-6789", "SSN [ID]"),
    ("UID 1.2.840.113619.2.55.3", "UID [ID]"),
])
def test_record_numbers(text, expected):
    out, audit = scrub_report(text)
    assert out == expected and audit["id"] == 1


def test_short_numbers_after_id_keywords_stay():
    text = "ID 1234, #3 rib, record 42, acc 12."
    assert scrub(text) == text


@pytest.mark.parametrize("text,expected", [
    ("92-year-old man", "[AGE]-year-old man"), ("92 year old", "[AGE] year old"),
    ("92 yo woman", "[AGE] yo woman"), ("92 y/o", "[AGE] y/o"), ("age 95", "age [AGE]"),
    ("aged 101", "aged [AGE]"), ("Age: 90", "Age: [AGE]"), ("95 years of age", "[AGE] years of age"),
    ("91M with cough", "[AGE]M with cough"), ("in her 90s", "in her [AGE]s"),
])
def test_ages_over_89(text, expected):
    out, audit = scrub_report(text)
    assert out == expected and audit["age"] == 1


@pytest.mark.parametrize("text", [
    "89-year-old man", "45 yo woman", "age 72", "aged 18", "65M with cough", "in his 80s", "___-year-old",
])
def test_ages_up_to_89_stay(text):
    assert scrub(text) == text


CLINICAL = [
    "No pleural effusion or pneumothorax.",
    "A 2.3 cm nodule in the right upper lobe; 1 cm nodule at the left base.",
    "Compression deformity of T12; C7 is not visualized; T10-T12 degenerative change.",
    "PA and lateral views of the chest. 3/4 views obtained. Grade 3/4 murmur.",
    "Endotracheal tube terminates approximately 4 cm above the carina.",
    "Heart rate 120, BP 120/80, O2 sat 92% on 2 L, temp 98.6 F, 10 mg IV.",
    "Ratio 2:1. 12-15 cm. 4-5 ribs. Lines and tubes as described.",
    "The lungs are clear. No mass. NG tube tip in the stomach. Swan-Ganz catheter in the right PA.",
    "INDICATION:  ___M with shortness of breath.  // eval",
    "COMPARISON:  Chest radiograph ___.",
    "Findings may represent atelectasis. May be related to technique.",
    "History of MS and DOE, s/p CABG in 2010. Study 2 of 3.",
    "Hx of MS Presenting With Cough; MR Angiography Pending. Doctor ___ aware.",
]


@pytest.mark.parametrize("text", CLINICAL)
def test_clinical_text_survives(text):
    out, audit = scrub_report(text, ["DOE^JOHN", "HOUSE^GREGORY"])
    if "DOE" in text:  # the patient's surname alone is removed even where it is an abbreviation
        assert out == text.replace("DOE", "[NAME]")
    else:
        assert out == text
        assert sum(audit.values()) == 0


def test_mimic_redactions_stay_and_audit_counts_all_rules():
    report = (
        "                                 FINAL REPORT\n"
        " INDICATION:  ___-year-old man (Doe, John, MRN 12345678) with dyspnea.\n"
        " COMPARISON:  ___ and 07/04/2019.\n"
        " FINDINGS: No pleural effusion. 2.3 cm nodule.\n"
        " IMPRESSION: Discussed with Dr. Welby by Dr. ___ at 2:15 pm on ___ via 617-555-0199,"
        " welby@hosp.org. 93-year-old.\n"
    )
    out, audit = scrub_report(report, ["DOE^JOHN"])
    assert audit == {"email": 1, "id": 1, "name": 1, "titled_name": 1, "date": 1, "time": 1, "phone": 1,
                     "age": 1}
    assert tuple(audit) == SCRUB_RULES
    for kept in ("FINAL REPORT", "INDICATION:", "___-year-old", "COMPARISON:  ___ and", "Dr. ___",
                 "on ___ via", "No pleural effusion. 2.3 cm nodule."):
        assert kept in out
    for gone in ("Doe", "John", "12345678", "07/04/2019", "Welby", "2:15", "617", "welby@", "93-"):
        assert gone not in out
    assert all(isinstance(v, int) for v in audit.values())


def test_identifiers_and_keyed_placeholders(ps):
    ids = [("accession", "87654321"), ("patient", "P1234"), ("study", "12")]  # "12" is too short
    text = "Acc 87654321 for p1234; 12 views."
    assert scrub(text, identifiers=ids) == "Acc [ID] for [ID]; 12 views."
    out, audit = scrub_report(text, identifiers=ids, pseudonymizer=ps)
    assert out == (f"Acc [ID:{ps.pseudonym('accession', '87654321')}] for "
                   f"[ID:{ps.pseudonym('patient', 'P1234')}]; 12 views.")
    assert audit["id"] == 2
    # a keyed placeholder is never matched again by the later rules
    many = " ".join(f"MRN {1000000 + i}" for i in range(300))
    out, audit = scrub_report(many, pseudonymizer=ps)
    assert audit["id"] == 300 and audit["date"] == audit["phone"] == 0
    assert re.fullmatch(r"(MRN \[ID:P-[0-9A-F]{16}\] ?)+", out)


def test_scrub_report_rejects_non_text():
    with pytest.raises(TypeError) as err:
        scrub_report(b"CANARY bytes")  # type: ignore[arg-type]
    assert "CANARY" not in str(err.value)
    assert scrub_report("") == ("", {rule: 0 for rule in SCRUB_RULES})


def test_deidentify_one_study(ps):
    ds = Dataset()
    ds.PatientName = "TANAKA^AKIKO"
    ds.ReferringPhysicianName = "CAREY^ELIZABETH"
    ds.PatientID = "10000032"
    ds.AccessionNumber = "87654321"
    ds.StudyDate = "21500312"
    ds.BurnedInAnnotation = "YES"
    report = "INDICATION: Akiko Tanaka, acc 87654321, per Dr. Carey.\nFINDINGS: No effusion."
    res = deidentify(ds, report, ps, patient_id="10000032", study_id="50000123")
    assert res.burned_in_annotation
    assert res.header["PatientID"] == ps.pseudonym("patient", "10000032")
    assert res.header["AccessionNumber"] == ps.pseudonym("accession", "87654321")
    assert res.report == "INDICATION: [NAME], acc [ID], per Dr. [NAME].\nFINDINGS: No effusion."
    assert res.audit["name"] == 2 and res.audit["id"] == 1
    keyed = deidentify(ds, report, ps, keyed_id_placeholders=True)
    assert f"acc [ID:{ps.pseudonym('accession', '87654321')}]," in keyed.report


def test_synthetic_reports_are_unchanged(tmp_path):
    """The synthetic corpus has no PHI in its reports: scrubbing must not touch them."""
    from pydicom import dcmread  # (medfuse_core.data.dicom would pull in torch: slow to import)

    from medfuse_core.data.synth import generate_corpus

    generate_corpus(tmp_path, n_studies=4, seed=5)
    ps = Pseudonymizer.for_synthetic_data()
    reports = sorted(tmp_path.glob("files/*/*/*.txt"))
    assert reports
    for path in reports:
        ds = dcmread(next(path.with_suffix("").glob("*.dcm")))
        text = path.read_text()
        res = deidentify(ds, text, ps)
        assert res.report == text
        assert not res.burned_in_annotation
        dump = json.dumps(res.header)
        for raw in (str(ds.PatientName), str(ds.PatientID), str(ds.AccessionNumber), str(ds.StudyDate),
                    str(ds.PatientBirthDate), str(ds.StudyInstanceUID), str(ds.InstitutionName)):
            assert raw not in dump


# =============================================================================== keys


def test_load_key_from_env(monkeypatch):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", SECRET_HEX)
    assert load_key() == bytes.fromhex(SECRET_HEX)
    monkeypatch.setenv("OTHER_KEY", SECRET_HEX.upper())
    assert load_key("OTHER_KEY") == bytes.fromhex(SECRET_HEX)
    assert Pseudonymizer.from_environment().key_id == Pseudonymizer(bytes.fromhex(SECRET_HEX)).key_id


def test_load_key_from_file(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDFUSE_DEID_KEY", raising=False)
    path = generate_key_file(tmp_path / "deid.key")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = load_key(key_file=path)
    assert len(key) == 32 and path.read_text().strip() == key.hex()
    monkeypatch.setenv("MEDFUSE_DEID_KEY_FILE", str(path))
    assert load_key() == key
    with pytest.raises(DeidKeyError):
        generate_key_file(path)  # never overwrites silently
    assert load_key(key_file=generate_key_file(path, overwrite=True)) != key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_key_errors_say_how_and_reveal_nothing(tmp_path, monkeypatch):
    for var in ("MEDFUSE_DEID_KEY", "MEDFUSE_DEID_KEY_FILE"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(DeidKeyError) as err:
        load_key()
    msg = str(err.value)
    assert "MEDFUSE_DEID_KEY" in msg and "medfuse keygen --out" in msg  # the command a CLI user runs

    monkeypatch.setenv("MEDFUSE_DEID_KEY", "CANARY-short-KQ")  # too short
    with pytest.raises(DeidKeyError) as err:
        load_key()
    assert "CANARY" not in str(err.value) and "KQ" not in str(err.value)

    monkeypatch.setenv("MEDFUSE_DEID_KEY", SECRET_HEX)
    bad = tmp_path / "CANARY-missing-dir" / "deid.key"
    with pytest.raises(DeidKeyError) as err:
        load_key(key_file=bad)  # an explicit key file must work: no fallback to the env key
    assert "CANARY" not in str(err.value) and SECRET_HEX.lower() not in str(err.value).lower()
    with pytest.raises(DeidKeyError) as err:
        generate_key_file(bad)
    assert "CANARY" not in str(err.value)


def test_module_imports_only_the_standard_library_and_pydicom():
    source = open(deid.__file__, encoding="utf-8").read()
    modules = set(re.findall(r"^(?:import|from)\s+([\w]+)", source, re.MULTILINE))
    assert modules <= {"__future__", "datetime", "hashlib", "hmac", "logging", "math", "os", "re", "secrets",
                       "threading", "warnings", "contextlib", "dataclasses", "functools", "pathlib", "typing",
                       "pydicom", "medfuse_core"}
    assert re.findall(r"^from medfuse_core\.([\w.]+)", source, re.MULTILINE) == ["data.pydicom_quiet"]  # stdlib-only helper
