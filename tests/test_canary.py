"""Canary test: patient data planted in headers, reports and a folder name never reaches any output.

Unique canary strings go into 30 Annex E attributes of every image, into the report text
(names in header order and in prose order, a titled name, a date, a time, a phone number, a
record number, an age over 89) and into the name of the folder holding the archive. Then the
real ingest, finetune and evaluate run with MLflow, and everything they wrote is scanned:
the workdir (shards, checkpoints, model bundle, MLflow database and artifacts), the Ray
session logs, and the captured stdout/stderr. A positive control proves the scanner finds a
canary written on purpose, also inside a compressed Parquet file.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pytest

from pipelines.cli import main
from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES

pytestmark = pytest.mark.slow

HEADER_CANARIES = {
    "PatientName": "Quokkaplume^Zebedine",
    "PatientID": "CNRYPID58213",
    "PatientBirthDate": "19230417",
    "OtherPatientIDs": "CNRYOPID77421",
    "PatientAddress": "CNRY 12 Wallaby Lane Brindlemoor",
    "PatientTelephoneNumbers": "CNRYTEL5550199",
    "PatientMotherBirthName": "Larkspurrow^Hepzibah",
    "ReferringPhysicianName": "Vantablack^Ottoline",
    "InstitutionName": "CNRY Hospital of Gorsemere",
    "InstitutionAddress": "CNRY 99 Gorsebrook Road",
    "InstitutionalDepartmentName": "CNRY Department of Quillon",
    "AccessionNumber": "CNRYACC4411",
    "StudyID": "CNRYSID9",
    "StationName": "CNRYSTATION7",
    "OperatorsName": "Thistlewood^Marigold",
    "PerformingPhysicianName": "Ashgrove^Peregrine",
    "RequestingPhysician": "Fenwhistle^Cordelia",
    "PhysiciansOfRecord": "Brackenbury^Isolde",
    "NameOfPhysiciansReadingStudy": "Copperfin^Lysandrel",
    "StudyDescription": "CNRY study description Wexmoor",
    "SeriesDescription": "CNRY series description Wexmoor",
    "MilitaryRank": "CNRYRANK",
    "EthnicGroup": "CNRYETHNIC",
    "Occupation": "CNRY Tinsmith",
    "AdditionalPatientHistory": "CNRY history of Yarrowdale",
    "PatientComments": "CNRY comment Pellucid",
    "DeviceSerialNumber": "CNRYSERIAL3321",
    "MedicalRecordLocator": "CNRYMRL7788",
    "IssuerOfPatientID": "CNRYISSUER",
    "RegionOfResidence": "CNRY region Fallowmere",
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.777123456789",
    "StudyDate": "19310317",
}
REPORT_CANARY = (
    "INDICATION: Zebedine Quokkaplume, 93-year-old, MRN 58213447, seen by Dr. Gallowglass, "
    "call (617) 555-0142 on 03/17/1931 at 14:32. Shortness of breath.\n"
)
FOLDER_CANARY = "CNRYFOLDER-Wexmoor"

# what must never appear anywhere (lower-cased search)
CANARIES = sorted({
    "quokkaplume", "zebedine", "larkspurrow", "hepzibah", "vantablack", "ottoline", "gorsemere", "gorsebrook",
    "quillon", "thistlewood", "marigold", "ashgrove", "peregrine", "fenwhistle", "cordelia", "brackenbury",
    "isolde", "copperfin", "lysandrel", "wexmoor", "tinsmith", "yarrowdale", "pellucid", "fallowmere",
    "wallaby lane", "gallowglass", "cnrypid58213", "cnryopid77421", "cnrytel5550199", "cnryacc4411",
    "cnrysid9", "cnrystation7", "cnryrank", "cnryethnic", "cnryserial3321", "cnrymrl7788", "cnryissuer",
    "19230417", "1923-04-17", "19310317", "1931-03-17", "03/17/1931", "58213447", "555-0142",
    "93-year-old", "777123456789", FOLDER_CANARY.lower(),
})


def _plant(corpus: Path) -> int:
    n = 0
    for path in corpus.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        for keyword, value in HEADER_CANARIES.items():
            setattr(ds, keyword, value)
        ds.save_as(path)
        n += 1
    for report in corpus.rglob("s*.txt"):
        text = report.read_text()
        report.write_text(text.replace("INDICATION:", REPORT_CANARY + "HISTORY:", 1))
    return n


def _texts(path: Path):
    """Yield searchable lower-cased bytes of a file: Parquet decoded, zip members inflated, else raw."""
    data = path.read_bytes()
    yield data.lower()
    if path.suffix == ".parquet":
        table = pq.read_table(path)
        yield json.dumps(table.to_pylist(), default=lambda b: b.hex() if isinstance(b, bytes) else str(b)).lower().encode()
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                yield name.lower().encode()
                yield zf.read(name).lower()


def scan(roots: list[Path], extra_text: str = "") -> list[tuple[str, str]]:
    """(where, canary) for every canary found under ``roots`` or in ``extra_text``."""
    hits = []
    needles = [c.encode() for c in CANARIES]
    for root in roots:
        for path in [root] if root.is_file() else root.rglob("*"):
            if not path.is_file():
                continue
            lowered_name = str(path).lower().encode()
            for needle in needles:
                if needle in lowered_name:
                    hits.append((str(path), needle.decode()))
            try:
                for blob in _texts(path):
                    hits += [(str(path), n.decode()) for n in needles if n in blob]
            except OSError:
                continue
    lowered = extra_text.lower().encode()
    hits += [("<captured output>", n.decode()) for n in needles if n in lowered]
    return sorted(set(hits))


def test_no_canary_reaches_any_output(ray_local, tiny_corpus, tmp_path, capfd, monkeypatch):
    monkeypatch.setenv("MEDFUSE_DEID_KEY", "c4" * 32)
    archive = tmp_path / FOLDER_CANARY / "archive"
    shutil.copytree(tiny_corpus, archive)
    (archive / "medfuse-synthetic.json").unlink()  # treat it as a real archive: the key must be configured
    assert _plant(archive) > 50

    out = tmp_path / "out"
    data, workdir = out / "data", out / "train"
    assert main(["ingest", "--format", "mimic-cxr", "--root", str(archive), "--out", str(data),
                 "--image-size", "48", "--workdir", str(workdir)]) == 0  # with an MLflow ingest run
    assert main(["finetune", "--config", str(CPU_EXPERIMENT), "--data", str(data), "--workdir", str(workdir),
                 *TINY_OVERRIDES, "train.epochs=1"]) == 0
    assert main(["evaluate", "--model", str(workdir), "--data", str(data), "--out", str(out / "metrics.json")]) == 0
    captured = capfd.readouterr()

    summary = json.loads((data / "ingest_summary.json").read_text())
    assert summary["n_ok"] > 0 and summary["deid_audit"]["name"] > 0 and summary["deid_audit"]["titled_name"] > 0

    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    hits = scan([out, logs], captured.out + captured.err)
    assert hits == [], f"canaries leaked: {hits[:20]}"

    # positive control: the scanner finds canaries written on purpose, raw and inside compressed Parquet
    (out / "control.txt").write_text("note: Zebedine Quokkaplume")
    pq.write_table(pa.table({"x": ["MRN 58213447 " * 50]}), out / "control.parquet", compression="zstd")
    found = scan([out])
    assert (str(out / "control.txt"), "quokkaplume") in found
    assert (str(out / "control.parquet"), "58213447") in found
    assert scan([tmp_path / FOLDER_CANARY]), "the planted archive itself is full of canaries"
