"""Synthetic MIMIC-CXR-layout corpus: layout, CSVs, decodability, determinism, signal."""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfuse_core.data.dicom import decode_dicom
from medfuse_core.data.labels import CHEXPERT_LABELS
from medfuse_core.data.reports import clinical_context_checked, extract_sections
from medfuse_core.data.synth import CHEXPERT_TABLE, METADATA_TABLE, SPLIT_TABLE, generate_corpus, table_path


def table(root: Path, stem: str) -> Path:
    path = table_path(root, stem)  # .csv.gz (the default) or .csv
    assert path is not None, stem
    return path


def open_table(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix == ".gz" else open(path, newline="")


def read_csv(path: Path) -> list[dict]:
    with open_table(path) as fh:
        return list(csv.DictReader(fh))


def tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dicom_path(root: Path, row: dict) -> Path:
    sub = f"p{int(row['subject_id']):08d}"
    return root / "files" / sub[:3] / sub / f"s{row['study_id']}" / f"{row['dicom_id']}.dcm"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth12")
    calls = []
    summary = generate_corpus(root, 12, seed=0, progress=lambda done, total: calls.append((done, total)))
    return root, summary, calls


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth40")
    return root, generate_corpus(root, 40, seed=0)


def test_layout_and_csvs(small):
    root, summary, calls = small
    chex = read_csv(table(root, CHEXPERT_TABLE))
    split = read_csv(table(root, SPLIT_TABLE))
    meta = read_csv(table(root, METADATA_TABLE))
    with open_table(table(root, CHEXPERT_TABLE)) as fh:
        assert fh.readline().strip().split(",") == ["subject_id", "study_id", *CHEXPERT_LABELS]
    assert list(split[0]) == ["dicom_id", "study_id", "subject_id", "split"]
    for col in ("dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription", "ViewPosition",
                "Rows", "Columns", "StudyDate", "StudyTime"):
        assert col in meta[0]

    assert len(chex) == 12 == summary["n_studies"]
    assert len(split) == len(meta) == summary["n_images"]
    assert calls[-1] == (12, 12) and len(calls) == 12
    assert all(v in ("1.0", "0.0", "-1.0", "") for r in chex for k, v in r.items() if k in CHEXPERT_LABELS)

    studies = {(r["subject_id"], r["study_id"]) for r in chex}
    for row in split:
        assert (row["subject_id"], row["study_id"]) in studies
        assert row["split"] in ("train", "validate", "test")
        assert re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{8}){4}", row["dicom_id"])
        assert re.fullmatch(r"1\d{7}", row["subject_id"]) and re.fullmatch(r"5\d{7}", row["study_id"])
        path = dicom_path(root, row)
        assert path.is_file() and path.parent.parent.name == f"p{row['subject_id']}"
        assert path.parent.parent.parent.name == f"p{row['subject_id'][:2]}"
        assert (path.parent.parent / f"s{row['study_id']}.txt").is_file()
    # every file on disk is listed
    assert len(list((root / "files").rglob("*.dcm"))) == len(split)
    assert len(list((root / "files").rglob("*.txt"))) == len(chex)


def test_split_by_patient(medium):
    root, summary = medium
    split_of: dict[str, set] = {}
    for row in read_csv(table(root, SPLIT_TABLE)):
        split_of.setdefault(row["subject_id"], set()).add(row["split"])
    assert all(len(s) == 1 for s in split_of.values())
    counts = {k: sum(k in s for s in split_of.values()) for k in ("train", "validate", "test")}
    assert counts["validate"] >= 1 and counts["test"] >= 1 and counts["train"] > counts["test"]
    assert summary["n_patients"] == len(split_of)
    per_patient = {}
    for row in read_csv(table(root, CHEXPERT_TABLE)):
        per_patient[row["subject_id"]] = per_patient.get(row["subject_id"], 0) + 1
    assert set(per_patient.values()) <= {1, 2, 3}


def test_every_dicom_decodes_and_matches_metadata(small):
    root, _, _ = small
    for row in read_csv(table(root, METADATA_TABLE)):
        path = dicom_path(root, row)
        ds = pydicom.dcmread(path)  # valid file meta: no force needed
        assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1" and ds.Modality == "DX"
        assert (ds.Rows, ds.Columns) == (int(row["Rows"]), int(row["Columns"]))
        assert 192 <= ds.Rows <= 384 and 192 <= ds.Columns <= 384
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert re.fullmatch(r"[A-Z]+\^[A-Z]+", str(ds.PatientName))
        assert ds.PatientID and ds.PatientBirthDate and ds.AccessionNumber and ds.InstitutionName
        assert ds.StudyDate == row["StudyDate"]
        assert ds.StudyInstanceUID.startswith("1.2.826.0.1.3680043.8.498.")
        img = decode_dicom(path, 64)
        assert img.pixels.shape == (64, 64) and img.pixels.std() > 0.1
        assert img.view_position == row["ViewPosition"] and img.modality == "DX"


def test_views(medium):
    root, summary = medium
    meta = read_csv(table(root, METADATA_TABLE))
    by_study: dict[str, list] = {}
    for row in meta:
        by_study.setdefault(row["study_id"], []).append(row["ViewPosition"])
    for views in by_study.values():
        assert views[0] in ("PA", "AP") and len(views) in (1, 2)
        assert all(v in ("LATERAL", "LL") for v in views[1:])
    assert 0.1 <= summary["n_lateral"] / summary["n_studies"] <= 0.5


def test_same_seed_identical_different_seed_differs(small, tmp_path):
    root, _, _ = small
    again = tmp_path / "again"
    other = tmp_path / "other"
    generate_corpus(again, 12, seed=0, workers=1)  # threading must not change the bytes
    generate_corpus(other, 12, seed=1)
    assert tree_hashes(root) == tree_hashes(again)
    a, b = tree_hashes(root), tree_hashes(other)
    assert set(a) != set(b)
    assert sorted(a.values()) != sorted(b.values())


def test_encoding_variants_appear(medium):
    root, summary = medium
    seen = {"MONOCHROME1": 0, "MONOCHROME2": 0, "rle": 0, "native": 0, "rescale": 0, "window": 0, "nonsquare": 0}
    for row in read_csv(table(root, METADATA_TABLE)):
        ds = pydicom.dcmread(dicom_path(root, row))
        seen[ds.PhotometricInterpretation] += 1
        seen["rle" if ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless else "native"] += 1
        if (float(ds.get("RescaleSlope", 1)), float(ds.get("RescaleIntercept", 0))) != (1.0, 0.0):
            seen["rescale"] += 1
        seen["window"] += "WindowCenter" in ds
        seen["nonsquare"] += ds.Rows != ds.Columns
    assert all(n > 0 for n in seen.values()), seen
    assert summary["encodings"]["RLE"] == seen["rle"]
    assert summary["encodings"]["MONOCHROME1"] == seen["MONOCHROME1"]


NEGATION = re.compile(r"\b(no|not|without)\b", re.I)
HEDGE = re.compile(r"\b(possible|possibly|may|cannot be excluded|cannot exclude|not excluded|questionable)\b", re.I)
KEYWORDS = {
    "Pleural Effusion": r"effusion|pleural fluid",
    "Pneumothorax": r"pneumothorax",
    "Cardiomegaly": r"cardiomegaly|heart|cardiac silhouette|cardiomediastinal",
    "Edema": r"edema",
    "Consolidation": r"consolidation",
    "Lung Lesion": r"nodule|mass",
    "Atelectasis": r"atelectasis",
    "Support Devices": r"tube|\blines?\b|catheter|pacemaker|devices",
}


def test_labels_consistent_with_report(medium):
    root, _ = medium
    checked = {"1.0": 0, "0.0": 0, "-1.0": 0}
    no_finding = {"1.0": 0, "": 0}
    for row in read_csv(table(root, CHEXPERT_TABLE)):
        sub = f"p{row['subject_id']}"
        text = (root / "files" / sub[:3] / sub / f"s{row['study_id']}.txt").read_text()
        assert "FINAL REPORT" in text  # a wet read or an addendum may stand above it
        sections = extract_sections(text)
        assert "findings" in sections  # unheaded body text counts as findings
        body = " ".join(sections.get(k, "") for k in ("findings", "impression", "wet_read", "addendum"))
        sentences = re.split(r"(?<=\.)\s+", body)
        for label, pattern in KEYWORDS.items():
            hits = [s for s in sentences if re.search(pattern, s, re.I)]
            value = row[label]
            if value == "1.0":
                assert any(not NEGATION.search(s) and not HEDGE.search(s) for s in hits), (label, body)
            elif value == "0.0":
                assert hits and all(NEGATION.search(s) or "normal" in s for s in hits), (label, body)
            elif value == "-1.0":
                assert any(HEDGE.search(s) for s in hits), (label, body)
            checked[value] = checked.get(value, 0) + 1
        assert row["Fracture"] in ("", "0.0") and row["Pleural Other"] == ""
        # as in MIMIC-CXR: No Finding is 1.0 on a normal study, blank (never 0.0) otherwise
        others = [row[k] for k in CHEXPERT_LABELS if k not in ("No Finding", "Support Devices")]
        assert row["No Finding"] in ("1.0", "")
        assert (row["No Finding"] == "1.0") == all(v in ("", "0.0") for v in others)
        no_finding[row["No Finding"]] += 1
        ctx, status = clinical_context_checked(text)
        assert status in ("ok", "none") and ctx == sections.get("indication", "") and (not ctx or ctx not in body)
    assert checked["1.0"] > 20 and checked["0.0"] > 20 and checked["-1.0"] > 0
    assert no_finding["1.0"] > 0 and no_finding[""] > 0


def test_summary_matches_labels(medium):
    root, summary = medium
    chex = read_csv(table(root, CHEXPERT_TABLE))
    for label in CHEXPERT_LABELS:
        assert summary["positives"][label] == sum(r[label] == "1.0" for r in chex)
    for label in ("Pleural Effusion", "Cardiomegaly", "Lung Lesion", "Support Devices"):
        assert 0.1 <= summary["positives"][label] / len(chex) <= 0.5, label
    assert summary["bytes"] == sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _chest_square(row: dict, size: int) -> tuple[float, float, float]:
    """(top, left, side) in decoded pixels of the square region the chest is drawn in."""
    H, W = int(row["Rows"]), int(row["Columns"])
    scale = size / max(H, W)
    h, w = round(H * scale), round(W * scale)
    side = min(H, W) * scale
    return (size - h) // 2 + (h - side) / 2, (size - w) // 2 + (w - side) / 2, side


def test_effusion_brightens_the_lung_bases(medium):
    """A one-number statistic (costophrenic-region brightness) separates effusion studies."""
    root, _ = medium
    labels = {r["study_id"]: r["Pleural Effusion"] for r in read_csv(table(root, CHEXPERT_TABLE))}
    pos, neg = [], []
    for row in read_csv(table(root, METADATA_TABLE)):
        if row["ViewPosition"] not in ("PA", "AP"):
            continue
        px = decode_dicom(dicom_path(root, row), 64).pixels
        top, left, side = _chest_square(row, 64)
        rows = slice(int(top + 0.62 * side), int(top + 0.74 * side))
        right = px[rows, int(left + 0.18 * side) : int(left + 0.36 * side)].mean()
        left_ = px[rows, int(left + 0.64 * side) : int(left + 0.82 * side)].mean()
        value = labels[row["study_id"]]
        if value == "1.0":
            pos.append(max(right, left_))
        elif value in ("0.0", ""):
            neg.append(max(right, left_))
    pos, neg = np.array(pos), np.array(neg)
    assert len(pos) >= 5 and len(neg) >= 10
    auc = float((pos[:, None] > neg[None, :]).mean())
    assert auc > 0.8, auc
    assert pos.mean() > neg.mean() + 0.05


def test_invalid_n_studies(tmp_path):
    with pytest.raises(ValueError):
        generate_corpus(tmp_path, 0)
    with pytest.raises(ValueError, match="tables"):
        generate_corpus(tmp_path, 1, tables="zip")


def test_tables_gzipped_by_default_plain_on_request(small, tmp_path):
    root, _, _ = small
    stems = (CHEXPERT_TABLE, SPLIT_TABLE, METADATA_TABLE)
    for stem in stems:  # as released: only the .csv.gz, and a real gzip stream
        assert (root / f"{stem}.csv.gz").read_bytes()[:2] == b"\x1f\x8b"
        assert not (root / f"{stem}.csv").exists()
    plain = tmp_path / "plain"
    generate_corpus(plain, 12, seed=0, tables="csv")
    for stem in stems:
        assert not (plain / f"{stem}.csv.gz").exists()
        assert (plain / f"{stem}.csv").read_bytes()[:2] != b"\x1f\x8b"
        assert read_csv(plain / f"{stem}.csv") == read_csv(root / f"{stem}.csv.gz")
    generate_corpus(plain, 1, seed=0)  # regenerating as gz removes the plain tables
    assert all(table(plain, stem).name == f"{stem}.csv.gz" for stem in stems)


def test_cli_synth_tables_option(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["synth", "--out", str(tmp_path / "csv"), "--studies", "1", "--tables", "csv"]) == 0
    assert table(tmp_path / "csv", CHEXPERT_TABLE).name == f"{CHEXPERT_TABLE}.csv"
    assert main(["synth", "--out", str(tmp_path / "gz"), "--studies", "1"]) == 0
    assert table(tmp_path / "gz", CHEXPERT_TABLE).name == f"{CHEXPERT_TABLE}.csv.gz"
    capsys.readouterr()
