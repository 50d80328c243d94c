"""``medfuse sr``: the findings of one DICOM file as a DICOM Comprehensive SR (highdicom)."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

highdicom = pytest.importorskip("highdicom")

from medfuse_core.data.labels import CHEXPERT_LABELS  # noqa: E402
from pipelines.cli import main  # noqa: E402
from pipelines.structured_report import findings_sr  # noqa: E402
from tests.conftest import CPU_EXPERIMENT, TINY_OVERRIDES  # noqa: E402

SOURCE = get_testdata_file("CT_small.dcm")


def _findings(sr):
    out = {}
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue != "121071":
            continue
        parts = {c.ConceptNameCodeSequence[0].CodeValue: c for c in item.ContentSequence}
        out[parts["121071"].TextValue] = (float(parts["PROB"].MeasuredValueSequence[0].NumericValue),
                                          parts["PRESENT"].ConceptCodeSequence[0].CodeMeaning)
    return out


def test_the_sr_is_an_unverified_diagnostic_imaging_report_of_the_source_study(tmp_path):
    src = pydicom.dcmread(SOURCE, stop_before_pixels=True)
    sr = findings_sr(src, ["Edema", "Pleural Effusion"], np.array([0.2, 0.9]), np.array([0, 1]), "medfuse-cxr", "4")
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    back = pydicom.dcmread(tmp_path / "sr.dcm")
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    code = back.ConceptNameCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator) == ("18748-4", "LN")
    assert back.VerificationFlag == "UNVERIFIED" and back.CompletionFlag == "PARTIAL"
    assert back.StudyInstanceUID == src.StudyInstanceUID and back.PatientID == src.PatientID
    assert back.Manufacturer == "medfuse" and back.ManufacturerModelName == "medfuse-cxr"
    assert _findings(back) == {"Edema": (0.2, "No"), "Pleural Effusion": (0.9, "Yes")}
    ref = back.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
    import torch

    from medfuse_core.experiment import load_config
    from medfuse_core.models import build_model, save_bundle

    cfg = load_config(CPU_EXPERIMENT, TINY_OVERRIDES)
    torch.manual_seed(0)
    model = build_model(cfg.model, len(CHEXPERT_LABELS), cfg.data.image_size, load_vision_weights=False).eval()
    return save_bundle(model, cfg.model, list(CHEXPERT_LABELS), cfg.data.image_size,
                       tmp_path_factory.mktemp("bundle") / "model")


def test_medfuse_sr_writes_the_models_calls_and_refuses_a_broken_file(bundle_dir, tmp_path, capsys):
    from medfuse_core.data.dicom import decode_dicom
    from medfuse_core.data.records import as_stored
    from medfuse_core.evaluation.inference import predict_frame
    from medfuse_core.models.bundle import load_bundle

    out = tmp_path / "out" / "sr.dcm"
    assert main(["sr", "--model", str(bundle_dir), "--dicom", SOURCE, "--out", str(out)]) == 0
    findings = _findings(pydicom.dcmread(out))
    bundle = load_bundle(bundle_dir)
    expected = predict_frame(bundle, [as_stored(decode_dicom(SOURCE, bundle.image_size).pixels)], [""])
    assert list(findings) == list(CHEXPERT_LABELS)
    assert np.allclose([p for p, _ in findings.values()], expected["prob"][0], atol=1e-4)
    assert [v == "Yes" for _, v in findings.values()] == [bool(y) for y in expected["pred"][0]]
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"DICM" + b"\0" * 64)
    bad_out = tmp_path / "bad.dcm"
    assert main(["sr", "--model", str(bundle_dir), "--dicom", str(broken), "--out", str(bad_out)]) == 2
    assert not bad_out.exists() and "--dicom" in capsys.readouterr().err
