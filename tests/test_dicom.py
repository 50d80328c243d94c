"""DICOM decoding: hand-computed values, photometric/VOI/RLE handling, typed failures."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from medfuse_core.data.dicom import (
    REASON_CODES,
    DecodedImage,
    DicomDecodeError,
    decode_dicom,
    modality_pixels,
    read_dataset,
)

PATIENT = "SECRET^PATIENT"
PATIENT_ID = "PID-998877"


def make_dataset(stored: np.ndarray, photometric: str = "MONOCHROME2", **extra) -> Dataset:
    """A minimal DX image with 12-bit values stored in 16 bits."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.42"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = PATIENT
    ds.PatientID = PATIENT_ID
    ds.Modality = "DX"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # lower-case CS value on purpose
        ds.ViewPosition = "pa"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(stored, dtype="<u2").tobytes()
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def stored() -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:40]
    img = 300 + 60 * xx + 20 * yy + rng.integers(0, 50, (48, 40))
    return np.clip(img, 0, 4095).astype(np.uint16)


def assert_generic(exc: DicomDecodeError, *secrets: str) -> None:
    text = str(exc) + repr(exc)
    for secret in (PATIENT, PATIENT_ID, "SECRET", *secrets):
        assert secret not in text
    assert exc.reason in REASON_CODES
    # nothing chained that a traceback printer would show
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)


def test_modality_lut_exact(stored):
    ds = read_dataset(to_bytes(make_dataset(stored, RescaleSlope="2.5", RescaleIntercept="-1024")))
    out = modality_pixels(ds)
    assert out.dtype == np.float32 and out.shape == stored.shape
    np.testing.assert_array_equal(out, 2.5 * stored.astype(np.float64) - 1024)


def test_no_rescale_is_identity(stored):
    out = modality_pixels(read_dataset(to_bytes(make_dataset(stored))))
    np.testing.assert_array_equal(out, stored.astype(np.float32))


def test_decoded_image_fields_and_range(stored):
    img = decode_dicom(to_bytes(make_dataset(stored)), 32)
    assert isinstance(img, DecodedImage)
    assert img.pixels.shape == (32, 32) and img.pixels.dtype == np.float32
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0
    assert img.modality == "DX" and img.view_position == "PA"
    assert img.photometric == "MONOCHROME2" and img.transfer_syntax == ExplicitVRLittleEndian
    assert img.n_frames == 1
    # 48x40 letterboxed: content is 32 rows x 27 columns, centred, padding 0
    assert np.all(img.pixels[:, :2] == 0) and np.all(img.pixels[:, -2:] == 0)
    assert img.pixels[:, 3:29].max() == 1.0


def test_monochrome1_equals_inverted_monochrome2_twin(stored):
    mono1 = decode_dicom(to_bytes(make_dataset(stored, "MONOCHROME1")), 24)
    twin = decode_dicom(to_bytes(make_dataset(4095 - stored, "MONOCHROME2")), 24)
    np.testing.assert_allclose(mono1.pixels, twin.pixels, atol=1e-5)
    # and brightness really is flipped relative to the stored values
    plain = decode_dicom(to_bytes(make_dataset(stored, "MONOCHROME2")), 24)
    assert np.corrcoef(plain.pixels[:, 4:20].ravel(), mono1.pixels[:, 4:20].ravel())[0, 1] < -0.99


def test_rescale_does_not_change_display(stored):
    base = decode_dicom(to_bytes(make_dataset(stored)), 40)
    scaled = decode_dicom(to_bytes(make_dataset(stored, RescaleSlope="0.5", RescaleIntercept="100")), 40)
    np.testing.assert_allclose(base.pixels, scaled.pixels, atol=1e-5)


def test_voi_window_applied_only_when_asked():
    ramp = np.tile(np.arange(0, 4000, 100, dtype=np.uint16), (40, 1))  # 40x40, columns 0..3900
    raw = to_bytes(make_dataset(ramp, WindowCenter="2000", WindowWidth="1000"))
    plain = decode_dicom(raw, 40).pixels
    windowed = decode_dicom(raw, 40, apply_voi=True).pixels
    below, above = ramp[0] < 1500, ramp[0] >= 2500
    # without VOI the ramp is strictly increasing; with it, everything outside the window saturates
    assert np.all(np.diff(plain[0]) >= 0) and len(np.unique(plain[0, below])) > 5
    assert np.all(windowed[:, below] == 0.0) and np.all(windowed[:, above] == 1.0)
    inside = (ramp[0] > 1600) & (ramp[0] < 2400)
    assert np.all((windowed[:, inside] > 0) & (windowed[:, inside] < 1))


def test_invalid_window_falls_back_to_unwindowed(stored):
    raw = to_bytes(make_dataset(stored, WindowCenter="2000", WindowWidth="0"))
    np.testing.assert_array_equal(decode_dicom(raw, 16, apply_voi=True).pixels, decode_dicom(raw, 16).pixels)


def test_rle_equals_uncompressed(stored):
    ds = make_dataset(stored, RescaleSlope="2", RescaleIntercept="-1024")
    plain = to_bytes(ds)
    ds.compress(RLELossless, generate_instance_uid=False)
    rle = to_bytes(ds)
    assert read_dataset(rle).file_meta.TransferSyntaxUID == RLELossless
    np.testing.assert_array_equal(modality_pixels(read_dataset(rle)), modality_pixels(read_dataset(plain)))
    np.testing.assert_array_equal(decode_dicom(rle, 32).pixels, decode_dicom(plain, 32).pixels)


def test_constant_image_is_zero_not_nan():
    img = decode_dicom(to_bytes(make_dataset(np.full((20, 20), 777, np.uint16))), 20)
    assert np.all(img.pixels == 0.0)


def test_path_source(tmp_path, stored):
    path = tmp_path / f"{PATIENT_ID}.dcm"
    path.write_bytes(to_bytes(make_dataset(stored)))
    assert decode_dicom(path, 16).pixels.shape == (16, 16)
    assert decode_dicom(str(path), 16).pixels.shape == (16, 16)


@pytest.mark.parametrize("cut", [200, 0.5, -1])
def test_truncated_file(tmp_path, stored, cut):
    raw = to_bytes(make_dataset(stored))
    n = cut if isinstance(cut, int) and cut > 0 else (len(raw) - 1 if cut == -1 else int(len(raw) * cut))
    path = tmp_path / "SECRET_patient_file.dcm"
    path.write_bytes(raw[:n])
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(path, 32)
    assert info.value.reason in ("truncated", "unreadable")
    assert_generic(info.value, str(path), "SECRET_patient_file")


def test_truncated_rle_file(stored):
    ds = make_dataset(stored)
    ds.compress(RLELossless, generate_instance_uid=False)
    raw = to_bytes(ds)
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(raw[: len(raw) - 300], 32)
    assert info.value.reason == "truncated"


def test_no_pixel_data(stored):
    ds = make_dataset(stored)
    for key in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, key)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(to_bytes(ds), 32)
    assert info.value.reason == "no_pixel_data"
    assert_generic(info.value)


def test_real_non_image_object():
    path = get_testdata_file("rtplan.dcm")
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(path, 32)
    assert info.value.reason == "no_pixel_data"
    assert "rtplan" not in str(info.value)


@pytest.mark.parametrize("blob", [b"garbage bytes" * 40, b"\x00" * 10, b"DICM", b""])
def test_garbage_is_unreadable(blob):
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(blob, 32)
    assert info.value.reason == "unreadable"
    assert_generic(info.value)


def test_missing_file_is_io_error(tmp_path):
    path = tmp_path / "SECRET_missing.dcm"
    with pytest.raises(DicomDecodeError) as info:
        read_dataset(path)
    assert info.value.reason == "io_error"
    assert_generic(info.value, str(path))


def test_unsupported_transfer_syntax(stored):
    ds = read_dataset(to_bytes(make_dataset(stored)))
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7"  # no decoder knows it
    with pytest.raises(DicomDecodeError) as info:
        modality_pixels(ds)
    assert info.value.reason == "unsupported_transfer_syntax"


def test_bad_shape_and_frame(stored):
    ds = read_dataset(to_bytes(make_dataset(stored)))
    ds.Rows = 0
    with pytest.raises(DicomDecodeError) as info:
        modality_pixels(ds)
    assert info.value.reason == "bad_shape"
    ds = read_dataset(to_bytes(make_dataset(stored)))
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(ds, 16, frame=3)
    assert info.value.reason == "bad_frame"


def test_pixel_data_shorter_than_header(stored):
    ds = make_dataset(stored)
    ds.PixelData = ds.PixelData[:-200]  # well-formed element, but too short for Rows x Columns
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(to_bytes(ds), 16)
    assert info.value.reason == "truncated"


def test_corrupt_rle_is_decode_failed(stored):
    ds = make_dataset(stored)
    ds.compress(RLELossless, generate_instance_uid=False)
    raw = bytearray(to_bytes(ds))
    start = len(raw) - len(ds.PixelData) - 8
    raw[start + 40 : start + 200] = b"\xff" * 160  # scramble the RLE header and segments
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(bytes(raw), 16)
    assert info.value.reason in ("decode_failed", "truncated")
    assert_generic(info.value)


def test_pydicom_warnings_are_silenced(stored, recwarn):
    ds = make_dataset(stored)
    ds.PixelData = ds.PixelData[:-200]
    with pytest.raises(DicomDecodeError):
        decode_dicom(to_bytes(ds), 16)
    decode_dicom(get_testdata_file("CT_small.dcm"), 16)
    assert not [w for w in recwarn if "pydicom" in (w.filename or "")]


def test_real_ct_file():
    path = get_testdata_file("CT_small.dcm")
    ref = pydicom.dcmread(path)
    img = decode_dicom(path, 64)
    assert img.pixels.shape == (64, 64) and img.modality == "CT"
    assert 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0 and img.pixels.std() > 0.05
    hu = modality_pixels(read_dataset(path))
    assert hu.shape == (ref.Rows, ref.Columns)
    assert hu.min() < -500  # air, in Hounsfield-like units
    np.testing.assert_allclose(hu, ref.pixel_array * float(ref.RescaleSlope) + float(ref.RescaleIntercept))


def test_error_pickles():
    import pickle

    err = pickle.loads(pickle.dumps(DicomDecodeError("truncated", "EOFError")))
    assert err.reason == "truncated" and err.cause == "EOFError"


# --------------------------------------------------------------------------- fast path
# Large files are parsed straight from the file; linear LUTs and MONOCHROME1 are applied after
# an area resize of the stored values; the unused-bits correction runs only when needed.

from pydicom.pixels import get_decoder  # noqa: E402
from pydicom.uid import DeflatedExplicitVRLittleEndian  # noqa: E402

from medfuse_core.data import dicom as dicom_mod  # noqa: E402


def radiograph(rows: int, cols: int, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
    img = 400 + 1.2 * xx + 0.8 * yy + 900 * np.exp(-(((xx - cols / 2) / (cols / 6)) ** 2))
    img += 300 * np.sin(yy / 9.0) ** 4 + rng.normal(0, 25, (rows, cols))
    return np.clip(img, 0, 4095).astype(np.uint16)


def full_size_reference(stored: np.ndarray, size: int, slope: float = 1.0, intercept: float = 0.0,
                        mono1: bool = False) -> np.ndarray:
    """The documented order at full size: modality LUT, inversion, resize, normalise, letterbox."""
    x = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    if mono1:
        x = (x.max() + x.min()) - x
    return dicom_mod._letterbox(dicom_mod._normalise(dicom_mod._resize_fit(x, size)), size)


@pytest.mark.parametrize("shape", [(512, 448), (300, 250), (40, 30)])  # integer, fractional, upscale
@pytest.mark.parametrize("photometric,slope,intercept", [
    ("MONOCHROME2", 1.0, 0.0), ("MONOCHROME1", 1.0, 0.0), ("MONOCHROME2", 2.5, -1024.0),
    ("MONOCHROME1", 0.5, 100.0), ("MONOCHROME2", -1.0, 4095.0),
])
def test_resize_first_equals_full_size_order(shape, photometric, slope, intercept):
    stored = radiograph(*shape)
    extra = {} if (slope, intercept) == (1.0, 0.0) else {"RescaleSlope": str(slope), "RescaleIntercept": str(intercept)}
    got = decode_dicom(to_bytes(make_dataset(stored, photometric, **extra)), 64).pixels
    want = full_size_reference(stored, 64, slope, intercept, photometric == "MONOCHROME1")
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_resize_is_area_average():
    x = radiograph(1024, 512)  # factor 4, several conversion strips
    out = dicom_mod._resize_fit(x, 256)
    blocks = x.astype(np.float64).reshape(256, 4, 128, 4).mean(axis=(1, 3))
    assert out.dtype == np.float32 and out.shape == (256, 128)
    np.testing.assert_allclose(out, blocks, rtol=1e-6)
    np.testing.assert_array_equal(out, dicom_mod._resize_fit(x.astype(np.float32), 256))
    # a fractional factor: adaptive area pooling; enlarging: bilinear
    import torch
    import torch.nn.functional as F

    y = radiograph(300, 250)
    t = torch.from_numpy(y.astype(np.float32))[None, None]
    np.testing.assert_allclose(dicom_mod._resize_fit(y, 64), F.interpolate(t, size=(64, 53), mode="area")[0, 0].numpy(),
                               rtol=1e-6)
    z = radiograph(20, 16)
    t = torch.from_numpy(z.astype(np.float32))[None, None]
    up = F.interpolate(t, size=(40, 32), mode="bilinear", align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(dicom_mod._resize_fit(z, 40), up, rtol=1e-6)


def test_per_frame_rescale_applies_after_resize():
    stack = np.stack([radiograph(64, 48, seed) for seed in range(3)])
    ds = make_dataset(stack[0])
    ds.NumberOfFrames = "3"
    ds.PixelData = np.ascontiguousarray(stack, dtype="<u2").tobytes()
    groups = []
    for slope, intercept in ((1, -1024), (-2, 0), (0.5, 10)):
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept = str(slope), str(intercept)
        item = Dataset()
        item.PixelValueTransformationSequence = [pvt]
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = groups
    parsed = read_dataset(to_bytes(ds))
    for i, (slope, intercept) in enumerate(((1, -1024), (-2, 0), (0.5, 10))):
        got = decode_dicom(parsed, 32, frame=i).pixels
        np.testing.assert_allclose(got, full_size_reference(stack[i], 32, slope, intercept), atol=2e-5)


def test_modality_lut_sequence_keeps_full_size_order():
    stored = radiograph(64, 48)
    ds = make_dataset(stored)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.LUTData = (np.sqrt(np.arange(4096)) * 1000).astype("<u2").tobytes()  # not linear (OW)
    ds.ModalityLUTSequence = [item]
    parsed = read_dataset(to_bytes(ds))
    lut = np.asarray(modality_pixels(parsed))
    np.testing.assert_array_equal(lut, (np.sqrt(stored.astype(np.float64)) * 1000).astype(np.uint16).astype(np.float32))
    want = dicom_mod._letterbox(dicom_mod._normalise(dicom_mod._resize_fit(lut, 32)), 32)
    np.testing.assert_array_equal(decode_dicom(parsed, 32).pixels, want)


def test_rescale_overflow_falls_back_to_full_size_repair():
    stored = radiograph(32, 32)
    stored[0, :4] = 0
    img = decode_dicom(to_bytes(make_dataset(stored, RescaleSlope="1e38", RescaleIntercept="0")), 16)
    assert np.isfinite(img.pixels).all() and 0.0 <= img.pixels.min() and img.pixels.max() <= 1.0


@pytest.mark.parametrize("signed", [False, True])
def test_unused_high_bits_are_ignored_like_pydicom(signed):
    rng = np.random.default_rng(3)
    if signed:
        values = rng.integers(-2048, 2048, (40, 30)).astype(np.int16)
        raw = values.view(np.uint16) ^ np.uint16(0x5000)  # garbage above bit 11
        ds = make_dataset(raw, PixelRepresentation=1)
    else:
        values = rng.integers(0, 4096, (40, 30)).astype(np.uint16)
        ds = make_dataset(values | np.uint16(0xA000))
    before = bytes(ds.PixelData)
    expected, _ = get_decoder(ds.file_meta.TransferSyntaxUID).as_array(ds, index=0)  # pydicom's defaults
    np.testing.assert_array_equal(expected, values)
    np.testing.assert_array_equal(modality_pixels(ds), values.astype(np.float32))
    clean = make_dataset(values.view(np.uint16), PixelRepresentation=int(signed))
    np.testing.assert_array_equal(decode_dicom(ds, 24).pixels, decode_dicom(clean, 24).pixels)
    assert bytes(ds.PixelData) == before


def test_modality_pixels_is_writable_and_owns_its_data(stored):
    ds = read_dataset(to_bytes(make_dataset(stored)))
    out = modality_pixels(ds)
    out[0, 0] = -1.0  # must not touch the dataset
    assert modality_pixels(ds)[0, 0] == stored[0, 0]


# --------------------------------------------------------------------------- large files from a path


@pytest.fixture(scope="module")
def large(tmp_path_factory):
    """A 1100 x 1000 image (2.2 MB file), parsed straight from the file when given as a path."""
    stored = radiograph(1100, 1000)
    root = tmp_path_factory.mktemp("large")
    ds = make_dataset(stored, "MONOCHROME1", RescaleSlope="2", RescaleIntercept="-1000")
    path = root / "large.dcm"
    path.write_bytes(to_bytes(ds))
    assert path.stat().st_size >= dicom_mod._DIRECT_READ_MIN
    return stored, path


def test_large_path_equals_bytes(large):
    stored, path = large
    from_path, from_bytes = read_dataset(path), read_dataset(path.read_bytes())
    assert from_path == from_bytes and from_path.file_meta == from_bytes.file_meta
    assert from_path.PixelData == from_bytes.PixelData
    np.testing.assert_array_equal(decode_dicom(path, 96).pixels, decode_dicom(path.read_bytes(), 96).pixels)
    want = full_size_reference(stored, 96, 2.0, -1000.0, mono1=True)
    np.testing.assert_allclose(decode_dicom(path, 96).pixels, want, atol=2e-5)
    import pickle

    assert pickle.loads(pickle.dumps(from_path)) == from_path  # nothing unpicklable left behind


def test_large_rle_and_deflated_paths(large, tmp_path):
    stored, path = large
    base = read_dataset(path)
    for syntax in (RLELossless, DeflatedExplicitVRLittleEndian):
        ds = read_dataset(path)
        if syntax == RLELossless:
            ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
        out = tmp_path / "recoded.dcm"
        out.write_bytes(to_bytes(ds))
        parsed = read_dataset(out)
        assert parsed.file_meta.TransferSyntaxUID == syntax
        np.testing.assert_array_equal(modality_pixels(parsed), modality_pixels(base))
        np.testing.assert_array_equal(decode_dicom(out, 64).pixels, decode_dicom(path, 64).pixels)


@pytest.mark.parametrize("cut", [0.3, 0.7, -2])
def test_large_truncated_path(large, tmp_path, cut):
    _, path = large
    raw = path.read_bytes()
    n = len(raw) + cut if cut < 0 else int(len(raw) * cut)
    short = tmp_path / "SECRET_short.dcm"
    short.write_bytes(raw[:n])
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(short, 32)
    assert info.value.reason == "truncated"
    assert_generic(info.value, str(short))


def test_large_path_with_absurd_element_length(large, tmp_path):
    _, path = large
    raw = bytearray(path.read_bytes())
    at = raw.rfind(b"\xe0\x7f\x10\x00OW")  # (7FE0,0010) OW, 2 reserved bytes, 4-byte length
    assert at > 0
    raw[at + 8 : at + 12] = (0xFFFFFFF0).to_bytes(4, "little")  # 4 GiB declared in a 2 MB file
    bad = tmp_path / "absurd.dcm"
    bad.write_bytes(bytes(raw))
    with pytest.raises(DicomDecodeError) as info:
        read_dataset(bad)
    assert info.value.reason == "truncated"


def test_large_garbage_and_raw_dataset_paths(large, tmp_path):
    _, path = large
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes())
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(junk, 32)
    assert info.value.reason == "unreadable"
    # a preamble-less, meta-less dataset (implicit VR): read with force, like from bytes
    ds = Dataset(read_dataset(path))  # the elements only: no file meta
    buf = io.BytesIO()
    ds.save_as(buf, implicit_vr=True, little_endian=True)  # no preamble either
    bare = tmp_path / "bare.dcm"
    bare.write_bytes(buf.getvalue())
    assert buf.getvalue()[128:132] != b"DICM" and buf.getvalue()[:2] == b"\x08\x00"
    np.testing.assert_array_equal(decode_dicom(bare, 48).pixels, decode_dicom(buf.getvalue(), 48).pixels)
    np.testing.assert_array_equal(decode_dicom(bare, 48).pixels, decode_dicom(path, 48).pixels)
