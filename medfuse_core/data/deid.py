"""De-identification of DICOM headers and free-text reports before anything reaches a shard.

Reference: DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile, with the
Retain Longitudinal Temporal Information with Modified Dates option (dates shifted per
patient) and the Retain Patient Characteristics option (sex, age capped at 90).

Four pieces, all pure functions of their inputs and one secret key:

* **Keyed pseudonyms** (:class:`Pseudonymizer`): HMAC-SHA256 of ``kind`` + value under a
  secret key, so the same patient/study/accession maps to the same short token in every
  run and on every worker, and nobody without the key can recompute or reverse it. The
  key comes from :func:`load_key` (environment variable or key file, never an output).
* **Date shifting** (:func:`date_shift_days`, :func:`shift_date`): every date kept is moved
  back by 1-365 days, the same number for all studies of a patient, so intervals survive.
* **Header allow-list** (:func:`deidentify_header`): only the attributes in
  :data:`HEADER_ALLOW_LIST` are kept (validated), identifiers are replaced by pseudonyms
  (:data:`PSEUDONYMISED_ATTRIBUTES`), and everything else, private tags included, is
  dropped. :data:`ANNEX_E_ATTRIBUTES` lists Annex E attributes for tests and audits.
* **Report scrubbing** (:func:`scrub_report`): names from the study's own header, titled
  names, dates, times, phone numbers, e-mails, record numbers and ages over 89 become
  typed placeholders (:data:`PLACEHOLDERS`); the audit counts replacements per rule,
  never values. MIMIC's ``___`` redactions are left as they are.

No function here puts an input value (header value, report text, key, path) into an
exception message, a warning or a log record; pydicom's own value-echoing warnings and log
records are suppressed while headers are read.

Wiring (one record)::

    ps = Pseudonymizer(load_key())                 # or Pseudonymizer.for_synthetic_data()
    ds = read_dataset(rec["image_path"])           # then decode_dicom(ds, ...)
    if has_burned_in_annotation(ds): quarantine "burned_in_annotation"
    res = deidentify(ds, report_text, ps, patient_id=rec["patient_id"], study_id=rec["study_id"])
    row ids: pseudonymize_record_ids(rec, ps); report: res.report; header: res.header
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import math
import os
import re
import secrets
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence, Union

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID

from medfuse_core.data.pydicom_quiet import quiet_pydicom

__all__ = [
    "AGE_CAP",
    "ANNEX_E_ATTRIBUTES",
    "DEFAULT_KEY_ENV",
    "DEID_METHOD",
    "DEID_METHOD_CODES",
    "HEADER_ALLOW_LIST",
    "HEADER_FIELDS",
    "PLACEHOLDERS",
    "PSEUDONYMISED_ATTRIBUTES",
    "PSEUDONYM_KINDS",
    "SCRUB_RULES",
    "NAME_STOP_WORDS",
    "DeidKeyError",
    "DeidResult",
    "Pseudonymizer",
    "date_shift_days",
    "deidentify",
    "deidentify_header",
    "generate_key_file",
    "has_burned_in_annotation",
    "identifiers_from_header",
    "load_key",
    "names_from_header",
    "pseudonymize_record_ids",
    "scrub_report",
    "shift_date",
]

# =============================================================================== keys

DEFAULT_KEY_ENV = "MEDFUSE_DEID_KEY"
MIN_KEY_BYTES = 16

_KEY_HELP = (
    "provide the de-identification key in the environment variable {env} (hex, at least "
    "32 hex characters), or in a key file passed as deid.key_file=FILE or named by {env}_FILE; "
    "create one with `medfuse keygen --out FILE` and keep it outside all outputs (the same key "
    "gives the same pseudonyms, so keep one per archive)."
)

# Public, fixed key of the synthetic quickstart. Anyone can recompute these pseudonyms:
# never use it for real patient data.
_SYNTHETIC_KEY = hashlib.sha256(b"medfuse: synthetic data only - this key is public").digest()


class DeidKeyError(Exception):
    """The de-identification key is missing or unusable; the message says how to provide one."""


def _parse_key(text: str) -> bytes:
    """Key material from its text form: hex if it is hex, else the UTF-8 bytes."""
    text = text.strip()
    if re.fullmatch(r"(?:[0-9a-fA-F]{2})+", text):
        key = bytes.fromhex(text)
    else:
        key = text.encode("utf-8")
    if len(key) < MIN_KEY_BYTES:
        raise DeidKeyError(f"the de-identification key is too short (need at least {MIN_KEY_BYTES} bytes, "
                           f"i.e. {2 * MIN_KEY_BYTES} hex characters)")
    return key


def _read_key_file(path: Union[str, os.PathLike]) -> bytes:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, ValueError, TypeError):
        raise DeidKeyError("the de-identification key file cannot be read; "
                           + _KEY_HELP.format(env=DEFAULT_KEY_ENV)) from None
    return _parse_key(text)


def load_key(env_var: str = DEFAULT_KEY_ENV, key_file: Union[str, os.PathLike, None] = None) -> bytes:
    """Return the secret pseudonymisation key.

    Looked up in this order: ``key_file`` (when given it must work; no silent fallback),
    the environment variable ``env_var`` (hex text), a file named by ``{env_var}_FILE``.
    Raises :class:`DeidKeyError` when none is usable; messages never contain key material.
    """
    if key_file is not None:
        return _read_key_file(key_file)
    value = os.environ.get(env_var, "")
    if value.strip():
        return _parse_key(value)
    file_name = os.environ.get(f"{env_var}_FILE", "")
    if file_name.strip():
        return _read_key_file(file_name.strip())
    raise DeidKeyError("no de-identification key found; " + _KEY_HELP.format(env=env_var))


def generate_key_file(path: Union[str, os.PathLike], *, overwrite: bool = False) -> Path:
    """Write a new random 32-byte key (hex) to ``path`` with file mode 0600 and return the path.

    Refuses to replace an existing file unless ``overwrite=True``. Keep the file outside
    every output folder (shards, runs, MLflow stores).
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise DeidKeyError("the key file already exists; pass overwrite=True to replace it") from None
    except OSError:
        raise DeidKeyError("the key file cannot be created (missing folder or permissions)") from None
    try:
        os.fchmod(fd, 0o600)  # also when overwriting a file that had a looser mode
        os.write(fd, (secrets.token_bytes(32).hex() + "\n").encode("ascii"))
    finally:
        os.close(fd)
    return path


# =============================================================================== pseudonyms

# kind -> prefix of its pseudonyms.
PSEUDONYM_KINDS: dict[str, str] = {"patient": "P", "study": "S", "accession": "A", "record": "R"}
_PSEUDONYM_HEX = 16  # 64 bits: collisions are negligible below ~10^8 distinct values per kind
_DATE_SHIFT_DOMAIN = "date_shift"
_UID_DOMAIN = "uid"
MAX_DATE_SHIFT_DAYS = 365


class Pseudonymizer:
    """Keyed (HMAC-SHA256) pseudonyms, UIDs and date shifts; stable for one key.

    ``repr()`` shows only :attr:`key_id`, never the key. Instances pickle (Ray ships them to
    workers in memory), so treat a pickled instance like the key itself.
    """

    def __init__(self, key: bytes, *, synthetic: bool = False):
        if not isinstance(key, (bytes, bytearray)):
            raise TypeError("the pseudonymisation key must be bytes")
        if len(key) < MIN_KEY_BYTES:
            raise DeidKeyError(f"the de-identification key is too short (need at least {MIN_KEY_BYTES} bytes)")
        self._key = bytes(key)
        self.synthetic = bool(synthetic)

    @classmethod
    def for_synthetic_data(cls) -> "Pseudonymizer":
        """A pseudonymizer with a fixed, PUBLIC key: only for the synthetic corpus, never real data."""
        return cls(_SYNTHETIC_KEY, synthetic=True)

    @classmethod
    def from_environment(cls, env_var: str = DEFAULT_KEY_ENV,
                         key_file: Union[str, os.PathLike, None] = None) -> "Pseudonymizer":
        """``Pseudonymizer(load_key(env_var, key_file))``."""
        return cls(load_key(env_var, key_file))

    def __repr__(self) -> str:
        return f"Pseudonymizer(key_id={self.key_id}{', synthetic' if self.synthetic else ''})"

    __str__ = __repr__

    @property
    def key_id(self) -> str:
        """A short public fingerprint of the key (to record which key produced a dataset)."""
        return self._digest("key_id", "")[:4].hex()

    def _digest(self, domain: str, value: str) -> bytes:
        msg = domain.encode("utf-8") + b"\x1f" + value.encode("utf-8")
        return hmac.digest(self._key, msg, "sha256")

    @staticmethod
    def _normalise(value) -> str:
        if value is None or isinstance(value, (bytes, bytearray)):
            raise ValueError("a pseudonym needs a non-empty text or integer value")
        text = str(value).strip()
        if not text:
            raise ValueError("a pseudonym needs a non-empty text or integer value")
        return text

    def pseudonym(self, kind: str, value) -> str:
        """Short keyed pseudonym, e.g. ``"P-1A2B3C4D5E6F7A8B"`` for kind "patient".

        ``kind`` is one of :data:`PSEUDONYM_KINDS`; the same value under different kinds gives
        unrelated pseudonyms. The value is compared after stripping surrounding whitespace
        (leading zeros matter). Raises ValueError for an unknown kind or an empty value.
        """
        prefix = PSEUDONYM_KINDS.get(kind)
        if prefix is None:
            raise ValueError("unknown pseudonym kind; expected one of " + ", ".join(PSEUDONYM_KINDS))
        digest = self._digest(kind, self._normalise(value))
        return f"{prefix}-{digest.hex()[:_PSEUDONYM_HEX].upper()}"

    def uid(self, value) -> str:
        """Keyed replacement for a DICOM UID: ``"2.25."`` + a 128-bit decimal (valid UI, <= 44 chars)."""
        digest = self._digest(_UID_DOMAIN, self._normalise(value))
        return "2.25." + str(int.from_bytes(digest[:16], "big"))

    def date_shift_days(self, patient_id) -> int:
        """Per-patient date shift in days, in ``-365..-1`` (same patient, same shift)."""
        digest = self._digest(_DATE_SHIFT_DOMAIN, self._normalise(patient_id))
        return -(1 + int.from_bytes(digest[:8], "big") % MAX_DATE_SHIFT_DAYS)


def date_shift_days(pseudonymizer: Pseudonymizer, patient_id) -> int:
    """Per-patient date shift in days (``-365..-1``), derived from the keyed HMAC."""
    return pseudonymizer.date_shift_days(patient_id)


def _parse_da(value) -> _dt.date:
    text = str(value).strip()
    m = re.fullmatch(r"(\d{4})\.?(\d{2})\.?(\d{2})", text)  # DA, or the old ACR-NEMA "YYYY.MM.DD"
    if not m:
        raise ValueError("not a DICOM date (YYYYMMDD)")
    try:
        return _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        raise ValueError("not a valid calendar date") from None


def shift_date(value: str, days: int) -> str:
    """Shift a DICOM date ``"YYYYMMDD"`` by ``days`` and return ``"YYYYMMDD"``; ValueError if invalid."""
    date = _parse_da(value)
    try:
        return (date + _dt.timedelta(days=int(days))).strftime("%Y%m%d")
    except (OverflowError, ValueError):
        raise ValueError("the shifted date is out of range") from None


def pseudonymize_record_ids(rec: Mapping, pseudonymizer: Pseudonymizer) -> dict[str, str]:
    """``{"record_id", "study_id", "patient_id"}`` of a source record as pseudonyms ("" when missing)."""
    out = {}
    for field, kind in (("record_id", "record"), ("study_id", "study"), ("patient_id", "patient")):
        value = rec.get(field)
        try:
            out[field] = pseudonymizer.pseudonym(kind, value)
        except ValueError:
            out[field] = ""
    return out


# =============================================================================== quieting

# pydicom echoes header values in its warnings and log records: silence them while reading.
_quiet = quiet_pydicom


# =============================================================================== header

AGE_CAP = 90  # ages above 89 are reported as 90 ("90 or older", HIPAA Safe Harbor)

# Attributes kept (after validation), with the reason each is needed.
HEADER_ALLOW_LIST: dict[str, str] = {
    "Modality": "filter to radiographs (CR/DX) and report the modality mix",
    "ViewPosition": "view filter (PA/AP/LATERAL) and per-view metrics",
    "PhotometricInterpretation": "QA of MONOCHROME1 inversion and colour handling",
    "Rows": "image size QA (tiny or corrupt images)",
    "Columns": "image size QA (tiny or corrupt images)",
    "SamplesPerPixel": "grayscale vs colour QA",
    "BitsAllocated": "encoding QA",
    "BitsStored": "bit-depth QA (e.g. 12 bits in 16)",
    "PixelRepresentation": "signed vs unsigned pixel QA",
    "PixelSpacing": "physical scale (mm/pixel) for size-aware models and QA",
    "ImagerPixelSpacing": "physical scale at the detector for projection radiographs",
    "NumberOfFrames": "multi-frame QA (1 when absent)",
    "BodyPartExamined": "anatomy filter (CHEST)",
    "PatientSex": "subgroup/fairness metrics (Retain Patient Characteristics); M, F or O only",
    "PatientAge": "subgroup metrics; whole years from PatientAge or birth/study dates, capped at 90",
    "StudyDate": "longitudinal order; shifted by the patient's date shift, never raw",
    "TransferSyntaxUID": "decoder QA (compressed vs native); standard UIDs only",
    "SOPClassUID": "object type QA (DX/CR/secondary capture); standard UIDs only",
    "Manufacturer": "scanner/vendor domain-shift analysis (device make, not patient data)",
    "BurnedInAnnotation": "burned-in text flag that drives quarantine (YES/NO)",
    "LossyImageCompression": "lossy-compression QA (00/01)",
    "PresentationIntentType": "FOR PRESENTATION vs FOR PROCESSING images behave differently",
}

# Identifiers replaced by keyed pseudonyms: output key -> (pseudonym kind, reason).
PSEUDONYMISED_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "PatientID": ("patient", "patient-level splits and grouping"),
    "StudyID": ("study", "study-level grouping (the source's study id when given)"),
    "AccessionNumber": ("accession", "links image and report of one order (QA of pairing)"),
    "StudyInstanceUID": ("uid", "study grouping in DICOM terms (keyed 2.25 UID)"),
    "SeriesInstanceUID": ("uid", "series grouping (keyed 2.25 UID)"),
    "SOPInstanceUID": ("uid", "duplicate-image detection (keyed 2.25 UID)"),
}

# DeidentificationMethodCodeSequence code values (DCM coding scheme, CID 7050).
DEID_METHOD_CODES: dict[str, str] = {
    "113100": "Basic Application Confidentiality Profile",
    "113107": "Retain Longitudinal Temporal Information Modified Dates Option",
    "113108": "Retain Patient Characteristics Option",
}
DEID_METHOD = ("PS3.15 Annex E Basic Application Level Confidentiality Profile; medfuse allow-list; "
               "keyed pseudonyms (HMAC-SHA256); per-patient date shift; age capped at 90")

_MARKERS = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")

# Every key of the dict returned by deidentify_header, in order (absent values are None).
HEADER_FIELDS: tuple[str, ...] = tuple(HEADER_ALLOW_LIST) + tuple(PSEUDONYMISED_ATTRIBUTES) + _MARKERS

# PS3.15 Annex E (Table E.1-1) attributes that carry or may carry identifying information.
# Tests plant a canary in each; none may reach the output raw. PatientSex, PatientAge and
# StudyDate are also on the allow-list, but only validated / derived / shifted.
ANNEX_E_ATTRIBUTES: tuple[str, ...] = (
    # patient
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDs", "OtherPatientNames",
    "OtherPatientIDsSequence", "PatientBirthName", "PatientMotherBirthName", "PatientBirthDate",
    "PatientBirthTime", "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "PatientAddress",
    "PatientTelephoneNumbers", "MilitaryRank", "BranchOfService", "MedicalRecordLocator",
    "EthnicGroup", "Occupation", "PatientReligiousPreference", "PatientComments",
    "AdditionalPatientHistory", "MedicalAlerts", "Allergies", "SmokingStatus", "PregnancyStatus",
    "SpecialNeeds", "PatientState", "CountryOfResidence", "RegionOfResidence",
    "CurrentPatientLocation", "PatientInstitutionResidence", "AdmissionID", "AdmittingDiagnosesDescription",
    "ResponsiblePerson", "ResponsibleOrganization",
    # people and places
    "ReferringPhysicianName", "ReferringPhysicianAddress", "ReferringPhysicianTelephoneNumbers",
    "PhysiciansOfRecord", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName",
    "RequestingPhysician", "ConsultingPhysicianName", "InstitutionName", "InstitutionAddress",
    "InstitutionalDepartmentName", "StationName", "DeviceSerialNumber", "DetectorID",
    # study / order identifiers and descriptions
    "AccessionNumber", "StudyID", "StudyDescription", "SeriesDescription", "ProtocolName",
    "RequestedProcedureDescription", "RequestedProcedureID", "RequestAttributesSequence",
    "PerformedProcedureStepID", "PerformedProcedureStepDescription", "ScheduledProcedureStepID",
    "RequestingService", "ImageComments", "AcquisitionComments", "DerivationDescription",
    # dates and times
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate",
    "PerformedProcedureStepStartDate", "StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime",
    "InstanceCreationTime", "AcquisitionDateTime", "TimezoneOffsetFromUTC",
    # UIDs
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID",
    "InstanceCreatorUID", "DeviceUID", "IrradiationEventUID", "StorageMediaFileSetUID",
)

_CS = re.compile(r"[A-Z0-9 _]{1,16}")
_ENUMS = {
    "PatientSex": {"M", "F", "O"},
    "BurnedInAnnotation": {"YES", "NO"},
    "LossyImageCompression": {"00", "01"},
    "PresentationIntentType": {"FOR PRESENTATION", "FOR PROCESSING"},
}
_CS_KEYS = ("Modality", "ViewPosition", "PhotometricInterpretation", "BodyPartExamined", *_ENUMS)
_INT_KEYS = ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated", "BitsStored", "PixelRepresentation")
_SPACING_KEYS = ("PixelSpacing", "ImagerPixelSpacing")
_AS = re.compile(r"(\d{3})([DWMY])")


def _get(ds: Dataset, keyword: str):
    """An element's value, or None when absent or malformed (never raises)."""
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - malformed raw element
        return None
    if value is None or (isinstance(value, (str, bytes)) and not value):
        return None
    return value


def _text(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    if value is None or isinstance(value, (bytes, bytearray)):
        return None
    if isinstance(value, (MultiValue, list, tuple)):  # multi-valued: not a single value
        return None
    text = str(value).strip()
    return text or None


def _code_string(ds: Dataset, keyword: str) -> str | None:
    text = _text(ds, keyword)
    if text is None:
        return None
    text = text.upper()
    if not _CS.fullmatch(text):
        return None
    allowed = _ENUMS.get(keyword)
    return text if allowed is None or text in allowed else None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    value = _get(ds, keyword)
    if value is None:
        return default
    try:
        n = int(str(value).strip())
    except (TypeError, ValueError):
        return None
    return n if 0 <= n < 1 << 31 else None


def _spacing(ds: Dataset, keyword: str) -> list[float] | None:
    value = _get(ds, keyword)
    if not isinstance(value, (MultiValue, list, tuple)):
        return None
    try:
        pair = [float(v) for v in value]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(math.isfinite(v) and 0 < v < 1e4 for v in pair):
        return None
    return pair


def _standard_uid(value, transfer_syntax: bool = False) -> str | None:
    """A UID kept only when it is a registered (standard) UID of the expected type."""
    if value is None:
        return None
    try:
        uid = UID(str(value).strip())
        if not uid.is_valid or not uid.keyword:  # not in pydicom's UID registry: could be an instance UID
            return None
        if transfer_syntax != (uid.type == "Transfer Syntax"):
            return None
    except Exception:  # noqa: BLE001 - odd values are dropped, never echoed
        return None
    return str(uid)


def _age_years(ds: Dataset) -> int | None:
    """Whole years from PatientAge (nnnD/W/M/Y), else from birth and study dates; capped at 90."""
    years = None
    age = _text(ds, "PatientAge")
    m = _AS.fullmatch(age.upper()) if age else None
    if m:
        n, unit = int(m.group(1)), m.group(2)
        years = n if unit == "Y" else int(n / {"D": 365.25, "W": 52.1775, "M": 12}[unit])
    else:
        try:
            birth, study = _parse_da(_text(ds, "PatientBirthDate")), _parse_da(_text(ds, "StudyDate"))
        except (TypeError, ValueError):
            return None
        years = study.year - birth.year - ((study.month, study.day) < (birth.month, birth.day))
    if years is None or not 0 <= years <= 150:
        return None
    return min(years, AGE_CAP)


def _safe_pseudonym(pseudonymizer: Pseudonymizer, kind: str, value) -> str | None:
    if value is None or not str(value).strip():
        return None
    try:
        return pseudonymizer.uid(value) if kind == "uid" else pseudonymizer.pseudonym(kind, value)
    except ValueError:
        return None


def deidentify_header(ds: Dataset, pseudonymizer: Pseudonymizer, *,
                      patient_id: str | None = None, study_id: str | None = None) -> dict:
    """The de-identified header as a plain, JSON-ready dict with exactly :data:`HEADER_FIELDS`.

    Keeps only :data:`HEADER_ALLOW_LIST` (values validated; anything odd becomes None),
    replaces :data:`PSEUDONYMISED_ATTRIBUTES` by keyed pseudonyms, shifts StudyDate by the
    patient's shift and adds ``PatientIdentityRemoved="YES"``, ``DeidentificationMethod``
    and ``DeidentificationMethodCodeSequence`` (code values). Pass the source record's
    ``patient_id``/``study_id`` so that these pseudonyms (and the date shift) match the row's;
    otherwise the header's PatientID/StudyID are used. Never raises on header content.
    """
    with _quiet():
        out: dict = {}
        for key in _CS_KEYS:
            out[key] = _code_string(ds, key)
        for key in _INT_KEYS:
            out[key] = _int(ds, key)
        out["NumberOfFrames"] = _int(ds, "NumberOfFrames", default=1)
        for key in _SPACING_KEYS:
            out[key] = _spacing(ds, key)
        out["PatientAge"] = _age_years(ds)
        meta = getattr(ds, "file_meta", None)
        out["TransferSyntaxUID"] = _standard_uid(_get(meta, "TransferSyntaxUID") if meta is not None else None,
                                                 transfer_syntax=True)
        out["SOPClassUID"] = _standard_uid(_text(ds, "SOPClassUID"))
        manufacturer = _text(ds, "Manufacturer")
        ok = manufacturer is not None and len(manufacturer) <= 64 and manufacturer.isprintable()
        out["Manufacturer"] = manufacturer if ok else None

        patient = patient_id if patient_id not in (None, "") else _text(ds, "PatientID")
        study = study_id if study_id not in (None, "") else _text(ds, "StudyID")
        out["StudyDate"] = None
        study_date = _text(ds, "StudyDate")
        if study_date and patient is not None and str(patient).strip():
            try:
                out["StudyDate"] = shift_date(study_date, pseudonymizer.date_shift_days(patient))
            except ValueError:
                pass
        sources = {"PatientID": patient, "StudyID": study}
        for key, (kind, _reason) in PSEUDONYMISED_ATTRIBUTES.items():
            value = sources[key] if key in sources else _text(ds, key)
            out[key] = _safe_pseudonym(pseudonymizer, kind, value)

        out["PatientIdentityRemoved"] = "YES"
        out["DeidentificationMethod"] = DEID_METHOD
        out["DeidentificationMethodCodeSequence"] = list(DEID_METHOD_CODES)
    return {key: out[key] for key in HEADER_FIELDS}


def has_burned_in_annotation(ds: Dataset) -> bool:
    """True when the header declares BurnedInAnnotation "YES" (absent or malformed: False)."""
    with _quiet():
        return _code_string(ds, "BurnedInAnnotation") == "YES"


# Identifier attributes whose raw values are also searched for in the report text.
_ID_KINDS: dict[str, str] = {
    "PatientID": "patient", "OtherPatientIDs": "patient", "MedicalRecordLocator": "patient",
    "AccessionNumber": "accession", "StudyID": "study", "AdmissionID": "record",
    "RequestedProcedureID": "record", "PerformedProcedureStepID": "record",
    "ScheduledProcedureStepID": "record", "PlacerOrderNumberImagingServiceRequest": "record",
    "FillerOrderNumberImagingServiceRequest": "record",
}


def _walk(ds: Dataset) -> Iterator:
    """Every element of ``ds`` and its sequences; malformed elements are skipped."""
    try:
        elements = list(ds)
    except Exception:  # noqa: BLE001
        return
    for elem in elements:
        yield elem
        if getattr(elem, "VR", None) == "SQ":
            try:
                items = list(elem.value or ())
            except Exception:  # noqa: BLE001
                continue
            for item in items:
                if isinstance(item, Dataset):
                    yield from _walk(item)


def _values(elem) -> list[str]:
    try:
        value = elem.value
    except Exception:  # noqa: BLE001
        return []
    if value is None or isinstance(value, (bytes, bytearray)):
        return []
    items = list(value) if isinstance(value, (MultiValue, list, tuple)) else [value]
    return [s for s in (str(v).strip() for v in items) if s]


def names_from_header(ds: Dataset) -> list[str]:
    """Every person name (PN value, e.g. ``"LAST^FIRST^MIDDLE"``) in the header and its sequences.

    Covers PatientName, OtherPatientNames, ReferringPhysicianName, PerformingPhysicianName,
    OperatorsName, NameOfPhysiciansReadingStudy, ... (any attribute of VR PN), in tag order,
    without duplicates.
    """
    seen: dict[str, None] = {}
    with _quiet():
        for elem in _walk(ds):
            if getattr(elem, "VR", None) == "PN":
                for name in _values(elem):
                    seen.setdefault(name, None)
    return list(seen)


def identifiers_from_header(ds: Dataset) -> list[tuple[str, str]]:
    """``(kind, value)`` pairs of the header's identifiers (PatientID, AccessionNumber, ...).

    For :func:`scrub_report`'s ``identifiers``: the report may quote them verbatim.
    """
    seen: dict[tuple[str, str], None] = {}
    with _quiet():
        for elem in _walk(ds):
            kind = _ID_KINDS.get(getattr(elem, "keyword", "") or "")
            if kind:
                for value in _values(elem):
                    seen.setdefault((kind, value), None)
    return list(seen)


# =============================================================================== reports

SCRUB_RULES: tuple[str, ...] = ("email", "id", "name", "titled_name", "date", "time", "phone", "age")
PLACEHOLDERS: dict[str, str] = {
    "email": "[EMAIL]", "id": "[ID]", "name": "[NAME]", "titled_name": "[NAME]",
    "date": "[DATE]", "time": "[TIME]", "phone": "[PHONE]",
    "age": "[AGE]",  # an age of 90 or more
}
MIN_IDENTIFIER_CHARS = 4  # header identifiers shorter than this (StudyID "1") are not searched for

# Words never removed when they appear ALONE as a name part (a patient called "Clear" or
# "Mass"): removing them would blank ordinary report text. Such a name part is still removed
# next to another part of the name ("John Clear", "Clear, John") or after a title ("Mr. Clear").
# Trade-off: a lone mention of such a surname in a report survives.
NAME_STOP_WORDS: frozenset[str] = frozenset("""
a about above after again against all also am an and any are as at be been before being below
between both but by can could did do does done down during each few for from further had has
have he her here hers him his how i if in into is it its just may me might more most much must
my no nor not now of off on once one only or other our out over own per same she should so some
such than that the their them then there these they this those through to too two under until
up upon us very via was we were what when where which while who whom why will with would yet
you your
left right upper lower mid middle base bases basal apex apical new old prior post pre status
stable unchanged seen noted normal clear mass free fluid air heart chest lung lungs line lines
tube tubes port film view views lateral frontal portable upright supine erect study exam
comparison findings finding impression indication history technique reason patient male female
man woman boy girl baby child small large long short low high mild moderate severe trace tip
white black gray grey dark bright sign signs mark marker lead leads wire wires drain valve stent
clip clips staple staples suture shadow field fields angle lobe rib ribs bone bones soft tissue
density opacity effusion edema nodule focal cough fever pain silhouette contour carina catheter
pacemaker hope grace faith joy dawn rose bill june april august frank gene guy ray sunny will
page young king hill wall head neck back side bay story cross
ng og et ap pa pe iv ij cv ct mr ms er ed ll rl ml ul cm mm kg
kerley hampton westermark swan ganz dobhoff fleischner bochdalek morgagni golden hodgkin
parkinson alzheimer crohn addison cushing graves wegener kaposi pancoast chilaiditi marfan down
turner harrington foley hickman groshong greenfield nissen whipple holter
""".split())

# Titles; all-caps "MR"/"MS" without a dot are magnetic resonance / multiple sclerosis, not titles.
_TITLE = r"(?:(?i:dr|doctor|nurse|prof|professor)|(?i:mrs|mr|ms|mx)(?=\.)|Mrs|Mr|Ms|Mx|Miss|MISS)"
_UPPER = "A-ZÀ-ÖØ-Þ"  # Latin-1 capitals
_NAME_WORD = rf"[{_UPPER}][A-Za-zÀ-ÖØ-öø-ÿ'’-]*"
_TITLED = re.compile(
    rf"(?<![\w\[]){_TITLE}(?:\.[ \t]*|[ \t]+)"
    rf"(?P<v>(?:[{_UPPER}]\.[ \t]*)?{_NAME_WORD}(?:[ \t]+{_NAME_WORD})?)"
    r"(?![\w\]])"
)
_EMAIL = re.compile(
    r"(?<![\w.+-])(?P<v>[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,})(?![\w-])"
)

# --- identifiers
_ID_KEYWORDS = (
    r"MRN|MR\s*#|MR\s*(?:no|num(?:ber)?)\.?|medical\s+record(?:\s+(?:no\.?|number|#))?|"
    r"record(?:\s+(?:no\.?|number|#))?|accession(?:\s+(?:no\.?|number|#))?|acc(?:\s*(?:no\.?|#))?\.?|"
    r"patient\s+ID|ID|unit\s+(?:no\.?|number)"
)
_ID_KEYWORD = re.compile(
    rf"(?:(?<![\w\[])(?i:{_ID_KEYWORDS})(?![A-Za-z\]])|#)"
    r"[ \t]*[:#=]?[ \t]*(?P<v>[A-Za-z0-9][A-Za-z0-9-]*)"
)
_UID_LIKE = re.compile(r"(?<![\w.])(?P<v>\d+(?:\.\d+){4,})(?![\w]|\.\d)")
_LONG_DIGITS = re.compile(r"(?<![\w.,])(?P<v>\d{6,})(?!\d)")
_SSN = re.compile(r"(?<![\w-])(?P<v>\d{3}-\d{2}-\d{4})(?![\w-])")

# --- dates
_YEAR4 = r"(?:1[89]|2[0-2])\d\d"
# Month names in any case; abbreviations may end with "."; "may" only as "May"/"MAY" (modal verb).
_MONTH = (r"(?:(?i:january|february|march|april|june|july|august|september|october|november|december|"
          r"(?:jan|feb|mar|apr|jun|jul|aug|sept|sep|oct|nov|dec)\.?)|May|MAY)")
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_DATE_PATTERNS = [
    # 2019-07-04, 2019/07/04, 2019.07.04
    rf"(?<![\w.])(?P<v>{_YEAR4}(?P<s>[-/.])(?:0?[1-9]|1[0-2])(?P=s)(?:0?[1-9]|[12]\d|3[01]))(?![\w]|\.\d)",
    # 20190704
    rf"(?<![\w.])(?P<v>{_YEAR4}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01]))(?![\w.])",
    # July 4, 2019 / Jul 4 / Jul. 4th, 2019 / July 4 '19
    rf"(?<![\w])(?P<v>{_MONTH}[ \t]+{_DAY}(?:,?[ \t]+(?:{_YEAR4}|'\d\d))?)(?![\w])",
    # 4 July 2019 / 4th of July / 4 Jul
    rf"(?<![\w.])(?P<v>{_DAY}[ \t]+(?:of[ \t]+)?{_MONTH}(?:,?[ \t]+{_YEAR4})?)(?![\w])",
    # July 2019 / Jul. 2019
    rf"(?<![\w])(?P<v>{_MONTH},?[ \t]+{_YEAR4})(?![\w])",
    # 07/2019
    rf"(?<![\w/.])(?P<v>(?:0?[1-9]|1[0-2])/{_YEAR4})(?![\w/])",
]
_DATE_NAMED = [re.compile(p) for p in _DATE_PATTERNS]
# 07/04/2019, 7/4/19, 04.07.2019, 13-07-2019: checked for a plausible day and month below.
_DATE_NUMERIC = re.compile(r"(?<![\w./-])(?P<v>(\d{1,2})([/.-])(\d{1,2})\3(\d{4}|\d{2}))(?![\w/-]|\.\d)")

# --- times
_AMPM = r"(?:[aApP]\.?[mM]\.?(?![A-Za-z]))"
_TIME_PATTERNS = [
    rf"(?<![\w:.])(?P<v>(?:[01]?\d|2[0-3]):[0-5]\d(?::[0-5]\d)?(?:[ \t]*{_AMPM})?)(?![\w:]|\.\d)",
    rf"(?<![\w:.])(?P<v>(?:1[0-2]|0?[1-9])[ \t]*{_AMPM})",
    r"(?<![\w:.])(?P<v>(?:[01]\d|2[0-3])[0-5]\d[ \t]*(?i:hours|hrs|h))(?![\w])",
]
_TIMES = [re.compile(p) for p in _TIME_PATTERNS]

# --- phones
_EXT = r"(?:[ \t]*(?i:x|ext\.?|extension)[ \t]*\d{1,6})?"
_PHONE_PATTERNS = [
    # (617) 555-0199, 617-555-0199, 617.555.0199, 617 555 0199, +1 617 555 0199, 1-617-555-0199
    rf"(?<![\w+])(?P<v>(?:\+?1[ \t.-]?)?(?:\(\d{{3}}\)[ \t]?|\d{{3}}[ \t.-])\d{{3}}[ \t.-]\d{{4}}{_EXT})(?![\w-])",
    # +44 20 7946 0958 and other international forms
    rf"(?<![\w+])(?P<v>\+\d{{1,3}}(?:[ \t.-]?\(?\d{{1,4}}\)?){{2,5}}{_EXT})(?![\w-])",
    # 555-0199
    rf"(?<![\w.-])(?P<v>\d{{3}}-\d{{4}}{_EXT})(?![\w-])",
    # pager 41234, ext. 5-1234, tel 5551234
    r"(?<![\w])(?i:pager|beeper|pgr|ext\.?|extension|tel\.?|telephone|phone|fax|cell)[ \t]*(?:#|no\.?|:)?[ \t]*"
    r"(?P<v>\d[\d \t.-]{2,14}\d)(?![\w])",
]
_PHONES = [re.compile(p) for p in _PHONE_PATTERNS]

# --- ages over 89 (only the number is replaced: "[AGE]-year-old")
_AGE_N = r"(?P<v>9\d|1[0-2]\d)"
_AGE_PATTERNS = [
    rf"(?<![\w.]){_AGE_N}(?=[ \t]*-?[ \t]*(?i:years?|yrs?)[ \t]*-?[ \t]*(?i:old)\b)",
    rf"(?<![\w.]){_AGE_N}(?=[ \t]*(?i:yo|y/o|y\.o\.?|yr\.?[ \t]*old)(?![A-Za-z]))",
    rf"(?<![\w.]){_AGE_N}(?=[ \t]+(?i:years?)[ \t]+(?i:of)[ \t]+(?i:age)\b)",
    rf"(?<![\w])(?i:aged?)[ \t]*:?[ \t]*{_AGE_N}(?![\w.])",
    rf"(?<![\w.]){_AGE_N}(?=[ \t]?[MF][ \t]+(?i:with\b|w/|presenting\b|s/p\b|h/o\b|who\b))",
    rf"(?<![\w])(?i:in[ \t]+(?:his|her|their)[ \t]+){_AGE_N}(?='?s\b)",
]
_AGES = [re.compile(p) for p in _AGE_PATTERNS]


_DEFERRED_BASE = 0xE000  # Unicode private-use area: neither \w nor a digit, so no rule matches it
_DEFERRED_MAX = 0x1900
_DEFERRED = re.compile(r"\[ID([\ue000-\uf8ff])\]")


@dataclass
class _Ctx:
    """Per-call state: keyed identifier placeholders are held back until all rules have run,
    so that the digits of a pseudonym can never be matched by a later rule."""

    pseudonymizer: Pseudonymizer | None
    deferred: list[str]

    def finish(self, text: str) -> str:
        """Put the held-back pseudonyms into their placeholders."""
        if not self.deferred:
            return text

        def restore(m: re.Match) -> str:
            i = ord(m.group(1)) - _DEFERRED_BASE
            return f"[ID:{self.deferred[i]}]" if i < len(self.deferred) else PLACEHOLDERS["id"]

        return _DEFERRED.sub(restore, text)


def _sub(pattern: re.Pattern, text: str, repl) -> tuple[str, int]:
    """Replace group "v" of each match by ``repl(match)`` (a string, or None to keep the match)."""
    count = 0
    parts: list[str] = []
    last = 0
    for m in pattern.finditer(text):
        new = repl(m)
        if new is None:
            continue
        start, end = m.span("v")
        parts.append(text[last:start])
        parts.append(new)
        last = end
        count += 1
    if not count:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), count


def _id_placeholder(ctx: _Ctx, kind: str, value: str) -> str:
    """"[ID]", or with a pseudonymizer a held-back "[ID:<pseudonym>]" (see :class:`_Ctx`)."""
    if ctx.pseudonymizer is None or len(ctx.deferred) >= _DEFERRED_MAX:
        return PLACEHOLDERS["id"]
    try:
        pseudonym = ctx.pseudonymizer.pseudonym(kind, value)
    except ValueError:
        return PLACEHOLDERS["id"]
    ctx.deferred.append(pseudonym)
    return "[ID" + chr(_DEFERRED_BASE + len(ctx.deferred) - 1) + "]"


def _keyword_kind(keyword_text: str) -> str:
    low = keyword_text.lower()
    if low.startswith("acc"):
        return "accession"
    if low.startswith(("mrn", "mr", "medical", "patient", "unit")):
        return "patient"
    return "record"


def _plausible_numeric_date(m: re.Match) -> bool:
    a, sep, b, year = int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
    if len(year) == 4 and not re.fullmatch(_YEAR4, year):
        return False
    if sep == "." and len(year) != 4:  # "2.3.19" is more likely a list or version than a date
        return False
    us = 1 <= a <= 12 and 1 <= b <= 31
    eu = 1 <= b <= 12 and 1 <= a <= 31
    return us or eu


# ------------------------------------------------------------------ names


def _split_person_name(name: str) -> tuple[list[str], list[str]]:
    """(family words, given words) of one name: DICOM PN ("LAST^FIRST^MIDDLE^PREFIX^SUFFIX"),
    "Last, First Middle", or "First Middle Last"."""
    family: list[str] = []
    given: list[str] = []
    for group in name.split("="):  # alphabetic, ideographic, phonetic representations
        group = group.strip()
        if not group:
            continue
        if "^" in group:
            comps = group.split("^")
            family += comps[0].split()
            for comp in comps[1:3]:
                given += comp.split()
        elif "," in group:
            last, _, first = group.partition(",")
            family += last.split()
            given += first.split()
        else:
            words = group.split()
            family += words[-1:]
            given += words[:-1]
    clean = lambda ws: [w.strip(".,;:()\"") for w in ws if w.strip(".,;:()\"")]  # noqa: E731
    return clean(family), clean(given)


def _variants(word: str) -> list[str]:
    """A name word and, for hyphenated/apostrophe names, its parts ("Smith-Jones" -> Smith, Jones)."""
    out = [word]
    parts = [p for p in re.split(r"[-'’]", word) if p]
    if len(parts) > 1:
        out += parts
    return out


@dataclass(frozen=True)
class _NameMatcher:
    pattern: re.Pattern  # a run of name parts (words, initials) separated by spaces or commas
    strong: frozenset[str]  # parts that are a name on their own
    roles: Mapping[str, frozenset[tuple[int, str]]]  # part -> {(person index, "family"/"given")}


@lru_cache(maxsize=4096)
def _name_matcher(names: tuple[str, ...]) -> _NameMatcher | None:
    """The matcher for the given person names; None when they hold no usable word."""
    strong: set[str] = set()
    roles: dict[str, set[tuple[int, str]]] = {}
    initials: set[str] = set()
    for idx, name in enumerate(names):
        family, given = _split_person_name(name)
        for role, words, min_letters in (("family", family, 2), ("given", given, 3)):
            for word in words:
                for v in _variants(word):
                    low = v.lower()
                    if not any(ch.isalpha() for ch in low):
                        continue
                    roles.setdefault(low, set()).add((idx, role))
                    if sum(ch.isalpha() for ch in low) >= min_letters and low not in NAME_STOP_WORDS:
                        strong.add(low)
                if role == "given" and word[:1].isalpha():
                    initials.add(word[0].upper())
    if not roles:
        return None
    alts = sorted((re.escape(w) for w in roles), key=len, reverse=True)
    token = r"(?i:" + "|".join(alts) + r")(?![\w\]])"
    if initials:
        letters = "".join(sorted(initials))
        token = rf"(?:{token}|[{letters}]\.|[{letters}](?=[ \t]))"
    run = rf"(?<![\w\[])(?P<v>{token}(?:(?:[ \t]*,[ \t]*|\s+){token})*)"
    return _NameMatcher(re.compile(run), frozenset(strong),
                        {k: frozenset(v) for k, v in roles.items()})


_AFTER_TITLE = re.compile(rf"(?<![\w\[]){_TITLE}\.?[ \t]*$")
_INITIAL = re.compile(r"[A-Za-z]\.?")


def _weak_run_is_name(tokens: list[str], roles: Mapping[str, frozenset], after_title: bool) -> bool:
    """A run without a strong part is a name after a title ("Mr. Mass"), or when it holds a family
    and a given name of the same person, all capitalised ("Clear Mass", "MASS, CLEAR"; not "clear mass")."""
    words = [t for t in tokens if not _INITIAL.fullmatch(t)]
    if not words:
        return False
    if after_title:
        return True
    if not all(w[:1].isupper() for w in words):
        return False
    people: dict[int, set[str]] = {}
    for w in words:
        for idx, role in roles.get(w.lower(), ()):
            people.setdefault(idx, set()).add(role)
    return any(r == {"family", "given"} for r in people.values())


def _scrub_names(text: str, names: tuple[str, ...]) -> tuple[str, int]:
    matcher = _name_matcher(names)
    if matcher is None:
        return text, 0
    # A run needs one strong part (or see _weak_run_is_name). Ordinary words at its ends ("clear"
    # in "lungs are clear Smith") stay; initials ("J. Doe", "Doe, J.") go with the name.
    count = 0
    parts: list[str] = []
    last = 0
    for m in matcher.pattern.finditer(text):
        run = m.group("v")
        spans = [(t.start(), t.end()) for t in re.finditer(r"[^\s,]+", run)]
        tokens = [run[a:b] for a, b in spans]
        is_strong = [t.lower() in matcher.strong for t in tokens]
        if any(is_strong):
            first = 0
            while not is_strong[first] and not _INITIAL.fullmatch(tokens[first]):
                first += 1
            last_i = len(tokens) - 1
            while not is_strong[last_i] and not re.fullmatch(r"[A-Za-z]\.", tokens[last_i]):
                last_i -= 1
        elif _weak_run_is_name(tokens, matcher.roles, bool(_AFTER_TITLE.search(text, 0, m.start("v")))):
            first, last_i = 0, len(tokens) - 1
        else:
            continue
        start = m.start("v") + spans[first][0]
        end = m.start("v") + spans[last_i][1]
        parts.append(text[last:start])
        parts.append(PLACEHOLDERS["name"])
        last = end
        count += 1
    if not count:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), count


def _scrub_titled(text: str) -> tuple[str, int]:
    """Titled names; a trailing ordinary word ("Dr. Smith Was") is not part of the name."""
    count = 0
    parts: list[str] = []
    last = 0
    for m in _TITLED.finditer(text):
        v_start = m.start("v")
        words = list(re.finditer(r"\S+", m.group("v")))
        head = words[0].group().rstrip(".")
        if len(head) > 1 and head.lower() in NAME_STOP_WORDS:  # "Doctor Who", "DR. THE ..."
            continue
        if len(words) > 1 and words[-1].group().lower() in NAME_STOP_WORDS:
            words = words[:-1]
        end = v_start + words[-1].end()
        parts.append(text[last:v_start])
        parts.append(PLACEHOLDERS["titled_name"])
        last = end
        count += 1
    if not count:
        return text, 0
    parts.append(text[last:])
    return "".join(parts), count


# ------------------------------------------------------------------ identifiers


def _normalise_identifiers(identifiers) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for item in identifiers or ():
        if isinstance(item, str):
            kind, value = "record", item
        else:
            kind, value = item
            kind = kind if kind in PSEUDONYM_KINDS else "record"
        value = str(value).strip()
        if len(value) >= MIN_IDENTIFIER_CHARS:
            out.append((kind, value))
    return out


def _scrub_identifiers(text: str, identifiers: list[tuple[str, str]], ctx: _Ctx) -> tuple[str, int]:
    total = 0
    for kind, value in sorted(identifiers, key=lambda kv: len(kv[1]), reverse=True):
        pattern = re.compile(rf"(?<![\w\[])(?P<v>{re.escape(value)})(?![\w\]])", re.IGNORECASE)
        text, n = _sub(pattern, text, lambda m, k=kind, v=value: _id_placeholder(ctx, k, v))
        total += n
    return text, total


def scrub_report(text: str, names: Sequence[str] = (), *, pseudonymizer: Pseudonymizer | None = None,
                 identifiers: Iterable = ()) -> tuple[str, dict[str, int]]:
    """Replace PHI in report text by typed placeholders; returns ``(text, counts per rule)``.

    ``names``: the study's person names (``names_from_header(ds)``; PN "LAST^FIRST^MIDDLE",
    "Last, First" or "First Last"), matched as whole words in any order and case ("John Doe",
    "DOE, JOHN", "J. Doe", "Doe"; a given name alone only with >= 3 letters; words in
    :data:`NAME_STOP_WORDS` only next to another part of the name). ``identifiers``: header
    identifiers (strings or ``(kind, value)`` from :func:`identifiers_from_header`) removed
    wherever they occur (>= 4 characters). With a ``pseudonymizer``, identifier placeholders
    carry the keyed pseudonym (``"[ID:A-…]"``), so a report can be checked against its image's
    header pseudonyms without revealing either. The audit has every rule of
    :data:`SCRUB_RULES` with its number of replacements, never the values.
    """
    if not isinstance(text, str):
        raise TypeError("report text must be a str")
    if isinstance(names, str):
        names = [names]
    audit = {rule: 0 for rule in SCRUB_RULES}
    ctx = _Ctx(pseudonymizer, [])

    def run(rule: str, pattern: re.Pattern, repl=None) -> None:
        nonlocal text
        text, n = _sub(pattern, text, repl or (lambda m: PLACEHOLDERS[rule]))
        audit[rule] += n

    run("email", _EMAIL)

    text, n = _scrub_identifiers(text, _normalise_identifiers(identifiers), ctx)
    audit["id"] += n

    def keyword_id(m: re.Match):
        token = m.group("v")
        if sum(ch.isdigit() for ch in token) < 5:
            return None
        return _id_placeholder(ctx, _keyword_kind(m.group(0)), token)

    run("id", _ID_KEYWORD, keyword_id)

    name_tuple = tuple(sorted({str(n).strip() for n in names if n and str(n).strip()}))
    if name_tuple:
        text, n = _scrub_names(text, name_tuple)
        audit["name"] += n
    text, n = _scrub_titled(text)
    audit["titled_name"] += n

    run("id", _UID_LIKE)
    run("id", _SSN)
    for pattern in _DATE_NAMED[:2]:
        run("date", pattern)
    run("date", _DATE_NUMERIC, lambda m: PLACEHOLDERS["date"] if _plausible_numeric_date(m) else None)
    for pattern in _DATE_NAMED[2:]:
        run("date", pattern)
    for pattern in _TIMES:
        run("time", pattern)
    for pattern in _PHONES:
        run("phone", pattern)
    for pattern in _AGES:
        run("age", pattern)
    run("id", _LONG_DIGITS)
    return ctx.finish(text), audit


# =============================================================================== one call


@dataclass(frozen=True)
class DeidResult:
    """Everything a shard row needs from one study, de-identified."""

    header: dict  # deidentify_header(...)
    report: str  # scrubbed report text
    audit: dict[str, int]  # replacements per SCRUB_RULES rule (counts only)
    burned_in_annotation: bool  # has_burned_in_annotation(ds): quarantine by default


def deidentify(ds: Dataset, report: str, pseudonymizer: Pseudonymizer, *,
               patient_id: str | None = None, study_id: str | None = None,
               keyed_id_placeholders: bool = False) -> DeidResult:
    """De-identify one study: header allow-list + pseudonyms, report scrubbed with the header's
    own names and identifiers (plus ``patient_id``/``study_id``), burned-in flag.

    ``keyed_id_placeholders=True`` writes ``"[ID:<pseudonym>]"`` instead of ``"[ID]"`` in the
    report (for pairing QA; off by default because the tokens are noise for a text model).
    """
    header = deidentify_header(ds, pseudonymizer, patient_id=patient_id, study_id=study_id)
    ids = identifiers_from_header(ds)
    ids += [(kind, str(v)) for kind, v in (("patient", patient_id), ("study", study_id)) if v not in (None, "")]
    text, audit = scrub_report(report or "", names_from_header(ds), identifiers=ids,
                               pseudonymizer=pseudonymizer if keyed_id_placeholders else None)
    return DeidResult(header=header, report=text, audit=audit, burned_in_annotation=has_burned_in_annotation(ds))
