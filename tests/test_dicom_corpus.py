"""pydicom's bundled test data through :func:`decode_dicom`, lossless transfer-syntax twins,
Hounsfield units, enhanced multi-frame rescale, frame policies and size limits.

The corpus is listed from the installed package's data folders: ``get_testdata_files()``
would also try to download the external pydicom-data set, and ingest machines are offline.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
)

from tests import dicom_fuzz_harness as harness
from medfuse_core.data.dicom import (
    FRAME_POLICIES,
    MAX_FRAMES,
    REASON_CODES,
    DicomDecodeError,
    decode_dicom,
    frame_indices,
    is_image_sop_class,
    modality_pixels,
    read_dataset,
)

# Observed with pydicom 3.0.2 + pylibjpeg (libjpeg, openjpeg, rle): 89 of the 176 test_files/ decode.
MIN_DECODED_TEST_FILES = 89

# Bundled files that are broken on purpose (or not images), with the reason they must get.
EXPECTED_REASONS = {
    "JPEG-lossy.dcm": "decode_failed",  # NEMA NM1_JPLY: invalid SOS parameters (JPGExtended.dcm is the fix)
    "JPEG2000-embedded-sequence-delimiter.dcm": "decode_failed",  # delimiter bytes inside the codestream
    "MR_truncated.dcm": "truncated",  # pixel data shorter than declared
    "rtplan_truncated.dcm": "truncated",  # an RT plan cut off mid-element
    "badVR.dcm": "bad_shape",  # NumberOfFrames "1A"
    "meta_missing_tsyntax.dcm": "bad_shape",  # 2-byte PixelData, no image header
    "nested_priv_SQ.dcm": "bad_shape",  # 2-byte PixelData, no image header
    "no_meta.dcm": "unreadable",  # starts with a stray byte; pydicom cannot read it either
    "chrJapMulti.dcm": "truncated",  # CR image header, pixel data stripped (charset test file)
    "chrJapMultiExplicitIR6.dcm": "truncated",
    "chrKoreanMulti.dcm": "truncated",
}
NON_DICOM_SUFFIXES = (".txt", ".json", ".gz", ".icc", ".dump", ".md")


def _inspect(path) -> Dataset | None:
    """pydicom's own reading of a file (independent of medfuse); None when it is not DICOM."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return pydicom.dcmread(path)
        except Exception:  # noqa: BLE001 - maybe a dataset without file meta
            pass
        try:
            ds = pydicom.dcmread(path, force=True)
            return ds if "SOPClassUID" in ds else None
        except Exception:  # noqa: BLE001 - not DICOM
            return None


@pytest.fixture(scope="module")
def corpus():
    """{relative path: outcome} with outcome "decoded", a reason code or "CRASH:<type>"."""
    root = harness.Path(harness.DATA_ROOT)
    out = {}
    for path in harness.bundled_files():
        try:
            decode_dicom(path, 64)
            outcome = "decoded"
        except DicomDecodeError as exc:
            outcome = exc.reason
        except BaseException as exc:  # noqa: BLE001 - recorded, then asserted absent
            outcome = f"CRASH:{type(exc).__name__}"
        out[str(path.relative_to(root))] = outcome
    return out


def test_corpus_summary_and_no_uncaught_exceptions(corpus, capsys):
    rows = []
    for folder in harness.DATA_DIRS:
        counts = Counter(v for k, v in corpus.items() if k.startswith(folder + "/"))
        reasons = {k: v for k, v in sorted(counts.items()) if k != "decoded"}
        rows.append(f"  {folder:14s} files {sum(counts.values()):4d}  decoded {counts['decoded']:4d}  "
                    f"quarantined {sum(reasons.values()):4d} {reasons}")
    with capsys.disabled():
        print("\npydicom bundled corpus (decode_dicom, size 64):\n" + "\n".join(rows))
    assert not [k for k, v in corpus.items() if v.startswith("CRASH")]
    assert all(v == "decoded" or v in REASON_CODES for v in corpus.values())
    decoded = sum(1 for k, v in corpus.items() if k.startswith("test_files/") and v == "decoded")
    assert decoded >= MIN_DECODED_TEST_FILES


def test_known_broken_files_get_their_reason(corpus):
    by_name = {k.rsplit("/", 1)[-1]: v for k, v in corpus.items()}
    for name, reason in EXPECTED_REASONS.items():
        if name in by_name:
            assert by_name[name] == reason, name
    for key, outcome in corpus.items():
        if key.endswith(NON_DICOM_SUFFIXES) or key.endswith("README"):
            assert outcome == "unreadable", key


def test_non_image_objects_are_no_pixel_data(corpus):
    root = harness.Path(harness.DATA_ROOT)
    checked = []
    for key, outcome in corpus.items():
        name = key.rsplit("/", 1)[-1]
        ds = _inspect(root / key)
        if ds is None or name in EXPECTED_REASONS or any(k in ds for k in ("PixelData", "FloatPixelData")):
            continue
        sop = ds.get("SOPClassUID") or getattr(ds, "file_meta", Dataset()).get("MediaStorageSOPClassUID")
        if is_image_sop_class(sop) is False or not ("Rows" in ds or "Columns" in ds):
            assert outcome == "no_pixel_data", key
            checked.append(name)
    for name in ("rtplan.dcm", "rtstruct.dcm", "test-SR.dcm", "reportsi.dcm", "waveform_ecg.dcm",
                 "DICOMDIR", "ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm", "hotiron.dcm"):
        assert name in checked


def test_every_readable_image_decodes(corpus):
    root = harness.Path(harness.DATA_ROOT)
    for key, outcome in corpus.items():
        name = key.rsplit("/", 1)[-1]
        ds = _inspect(root / key)
        if ds is None or name in EXPECTED_REASONS:
            continue
        if "PixelData" in ds and "Rows" in ds and is_image_sop_class(ds.get("SOPClassUID")) is not False:
            assert outcome == "decoded", key


def test_sop_class_registry():
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.2") is True  # CT
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.481.2") is True  # RT Dose
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.66.4") is True  # Segmentation
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.481.5") is False  # RT Plan
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.88.11") is False  # Basic Text SR
    assert is_image_sop_class("1.2.840.10008.1.3.10") is False  # DICOMDIR
    assert is_image_sop_class("1.2.840.10008.5.1.4.1.1.9.1.1") is False  # 12-lead ECG
    assert is_image_sop_class("1.2.3.4") is None and is_image_sop_class(None) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a malformed UID is not echoed in a pydicom warning
        assert is_image_sop_class("SECRET^NOT-A-UID") is None


def _header_only(sop_class: str) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.7"
    ds.Rows, ds.Columns = 8, 8
    return _to_bytes(ds)


def test_image_header_without_pixels():
    # a non-image SOP class with stray image attributes is still not an image ...
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(_header_only("1.2.840.10008.5.1.4.1.1.88.33"), 16)
    assert info.value.reason == "no_pixel_data"
    # ... while an image class (or an unknown one) with Rows/Columns but no pixels was cut off
    for sop in ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5"):
        with pytest.raises(DicomDecodeError) as info:
            decode_dicom(_header_only(sop), 16)
        assert info.value.reason == "truncated"


# --------------------------------------------------------------------------- lossless twins


def _frames(name: str) -> list[np.ndarray]:
    ds = read_dataset(harness.bundled_file(name))
    return [modality_pixels(ds, i) for i in frame_indices(ds, "all")]


LOSSLESS_TWINS = [
    ("MR_small.dcm", "MR_small_RLE.dcm"),
    ("MR_small.dcm", "MR_small_jp2klossless.dcm"),
    ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm"),
    ("MR_small.dcm", "MR_small_implicit.dcm"),
    ("MR_small.dcm", "MR_small_bigendian.dcm"),
    ("MR_small.dcm", "MR_small_expb.dcm"),
    ("MR_small.dcm", "MR_small_padded.dcm"),
    ("SC_rgb_rle.dcm", "SC_rgb_jpeg_gdcm.dcm"),  # JPEG lossless, process 14 SV1
    ("SC_rgb_rle.dcm", "SC_rgb_gdcm_KY.dcm"),  # JPEG 2000 (reversible)
    ("SC_rgb_small_odd.dcm", "SC_rgb_small_odd_big_endian.dcm"),
    ("rtdose.dcm", "rtdose_rle.dcm"),  # 15 frames
    ("rtdose.dcm", "rtdose_expb.dcm"),
    ("rtdose_1frame.dcm", "rtdose_rle_1frame.dcm"),
    ("liver_1frame.dcm", "liver_expb_1frame.dcm"),  # 1 bit allocated
]


@pytest.mark.parametrize("ref,twin", LOSSLESS_TWINS, ids=[t for _, t in LOSSLESS_TWINS])
def test_bundled_lossless_twins_are_bit_identical(ref, twin):
    a, b = _frames(ref), _frames(twin)
    assert len(a) == len(b) >= 1
    for x, y in zip(a, b):
        assert x.shape == y.shape and x.dtype == y.dtype == np.float32
        np.testing.assert_array_equal(x, y)


def jpeg_lossless(image: np.ndarray, precision: int) -> bytes:
    """Encode a 2-D unsigned image as a JPEG lossless (process 14, predictor 1) codestream."""
    rows, cols = image.shape
    x = image.astype(np.int64)
    pred = np.empty_like(x)
    pred[0, 0] = 1 << (precision - 1)
    pred[0, 1:] = x[0, :-1]  # first row: left neighbour
    pred[1:, 0] = x[:-1, 0]  # first column: the sample above
    pred[1:, 1:] = x[1:, :-1]  # elsewhere: left neighbour (selection value 1)
    diff = (x - pred) & 0xFFFF
    diff = np.where(diff >= 0x8000, diff - 0x10000, diff).ravel()
    # Huffman table: the 17 difference categories all get 5-bit codes 0..16.
    bits, nbits, out = 0, 0, bytearray()

    def put(value: int, n: int) -> None:
        nonlocal bits, nbits
        bits, nbits = (bits << n) | (value & ((1 << n) - 1)), nbits + n
        while nbits >= 8:
            nbits -= 8
            byte = (bits >> nbits) & 0xFF
            out.append(byte)
            if byte == 0xFF:
                out.append(0x00)  # byte stuffing
        bits &= (1 << nbits) - 1

    for d in diff.tolist():
        ssss = 16 if d == -32768 else int(abs(d)).bit_length()
        put(ssss, 5)
        if 0 < ssss < 16:
            put(d if d > 0 else d + (1 << ssss) - 1, ssss)
    if nbits:
        put((1 << (8 - nbits)) - 1, 8 - nbits)  # pad with 1-bits
    sof = b"\xff\xc3" + (11).to_bytes(2, "big") + bytes([precision]) + rows.to_bytes(2, "big") \
        + cols.to_bytes(2, "big") + b"\x01\x01\x11\x00"
    counts = bytes([0, 0, 0, 0, 17] + [0] * 11)
    dht = b"\xff\xc4" + (2 + 1 + 16 + 17).to_bytes(2, "big") + b"\x00" + counts + bytes(range(17))
    sos = b"\xff\xda" + (8).to_bytes(2, "big") + b"\x01\x01\x00" + b"\x01\x00\x00"
    return b"\xff\xd8" + sof + dht + sos + bytes(out) + b"\xff\xd9"


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _recoded(name: str, syntax: str) -> bytes:
    """A bundled file re-encoded in another lossless transfer syntax."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(harness.bundled_file(name))
        if syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(syntax, generate_instance_uid=False)
        elif syntax in (JPEGLosslessSV1, JPEGLossless):
            stored = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder("=")).view(f"u{ds.BitsAllocated // 8}")
            ds.PixelData = encapsulate([jpeg_lossless(stored, int(ds.BitsStored))])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.file_meta.TransferSyntaxUID = syntax
    return _to_bytes(ds)


RECODINGS = [RLELossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGLossless, DeflatedExplicitVRLittleEndian,
             ImplicitVRLittleEndian]


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm"])
@pytest.mark.parametrize("syntax", RECODINGS, ids=[s.name for s in RECODINGS])
def test_recoded_lossless_twins_are_bit_identical(name, syntax):
    twin = read_dataset(_recoded(name, syntax))
    assert twin.file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(modality_pixels(twin), _frames(name)[0])
    np.testing.assert_array_equal(decode_dicom(twin, 64).pixels,
                                  decode_dicom(harness.bundled_file(name), 64).pixels)


def test_ct_is_in_hounsfield_units():
    path = harness.bundled_file("CT_small.dcm")
    ref = pydicom.dcmread(path)
    assert float(ref.RescaleSlope) == 1.0 and float(ref.RescaleIntercept) == -1024.0
    hu = modality_pixels(read_dataset(path))
    np.testing.assert_array_equal(hu, ref.pixel_array.astype(np.float32) - 1024.0)
    # a 128x128 downsample of NEMA CT1: air (not padding) is about -850 after averaging
    assert -1100 <= hu.min() <= -800
    assert np.percentile(hu, 1) < -800
    assert ((hu >= 0) & (hu <= 100)).mean() > 0.25  # soft tissue
    assert 500 < hu.max() < 3072  # bone, nothing beyond the 12-bit CT range


# --------------------------------------------------------------------------- multi-frame


ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


def enhanced_ct(stored: np.ndarray, per_frame=None, shared=None, top=None) -> Dataset:
    """An Enhanced CT object: ``stored`` [frames, rows, cols] int16, rescales in functional groups."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.SOPClassUID, ds.SOPInstanceUID = ENHANCED_CT, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.NumberOfFrames = str(stored.shape[0])
    ds.Rows, ds.Columns = stored.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1

    def group(rescale):
        item = Dataset()
        if rescale is not None:
            pvt = Dataset()
            pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = str(rescale[0]), str(rescale[1]), "HU"
            item.PixelValueTransformationSequence = [pvt]
        return item

    if per_frame is not None:
        ds.PerFrameFunctionalGroupsSequence = [group(r) for r in per_frame]
    if shared is not None:
        ds.SharedFunctionalGroupsSequence = [group(shared)]
    if top is not None:
        ds.RescaleSlope, ds.RescaleIntercept = str(top[0]), str(top[1])
    ds.PixelData = np.ascontiguousarray(stored, dtype="<i2").tobytes()
    return ds


@pytest.fixture(scope="module")
def stack() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 3000, (3, 12, 10)).astype(np.int16)


def test_per_frame_rescale_from_functional_groups(stack):
    rescales = [(1.0, -1024.0), (2.0, -2048.0), (0.5, 10.0)]
    ds = read_dataset(_to_bytes(enhanced_ct(stack, per_frame=rescales, top=(9.0, 9.0))))
    assert frame_indices(ds, "all") == [0, 1, 2]
    for i, (slope, intercept) in enumerate(rescales):
        np.testing.assert_array_equal(modality_pixels(ds, i), (stack[i] * slope + intercept).astype(np.float32))
        img = decode_dicom(ds, 16, frame=i)
        assert img.n_frames == 3 and img.frame == i


def test_shared_rescale_and_per_frame_precedence(stack):
    ds = read_dataset(_to_bytes(enhanced_ct(stack, shared=(2.0, -100.0))))
    for i in range(3):
        np.testing.assert_array_equal(modality_pixels(ds, i), (stack[i] * 2.0 - 100.0).astype(np.float32))
    # a frame without its own transformation falls back to the shared one
    ds = read_dataset(_to_bytes(enhanced_ct(stack, per_frame=[(3.0, 1.0), None, (1.0, 5.0)], shared=(2.0, 0.0))))
    expected = [stack[0] * 3.0 + 1.0, stack[1] * 2.0, stack[2] + 5.0]
    for i in range(3):
        np.testing.assert_array_equal(modality_pixels(ds, i), expected[i].astype(np.float32))


def test_frame_policies():
    assert set(FRAME_POLICIES) >= {"first", "middle", "all"}
    ds = read_dataset(harness.bundled_file("rtdose.dcm"))  # 15 frames
    assert frame_indices(ds, "first") == [0]
    assert frame_indices(ds, "middle") == [7]
    assert frame_indices(ds, "all") == list(range(15))
    single = read_dataset(harness.bundled_file("CT_small.dcm"))
    assert [frame_indices(single, p) for p in ("first", "middle", "all")] == [[0], [0], [0]]
    frames = [decode_dicom(ds, 16, frame=i).pixels for i in frame_indices(ds, "all")]
    assert len({f.tobytes() for f in frames}) > 1  # the frames differ
    with pytest.raises(ValueError):
        frame_indices(ds, "everything")


@pytest.mark.parametrize("value,reason", [("0", "bad_shape"), ("-3", "bad_shape"), ("abc", "bad_shape"),
                                          (str(MAX_FRAMES + 1), "too_large"), ("2147483647", "too_large")])
def test_absurd_number_of_frames(stack, value, reason):
    ds = enhanced_ct(stack, per_frame=[(1, 0)] * 3)
    text = value.encode() + b" " * (len(value) % 2)  # as read from a file: converted on access
    ds[0x00280008] = RawDataElement(Tag(0x00280008), "IS", len(text), text, 0, False, True)
    with pytest.raises(DicomDecodeError) as info:
        frame_indices(ds, "all")
    assert info.value.reason == reason
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(ds, 16)
    assert info.value.reason == reason


def test_encapsulated_frames_missing_is_truncated():
    ds = read_dataset(harness.bundled_file("SC_rgb_rle_2frame.dcm"))
    ds.NumberOfFrames = 3
    with pytest.raises(DicomDecodeError) as info:
        modality_pixels(ds, 0)
    assert info.value.reason == "truncated"


# --------------------------------------------------------------------------- limits


def test_declared_geometry_over_limit_is_too_large(stack):
    ds = enhanced_ct(stack, per_frame=[(1, 0)] * 3)  # 3 x 12 x 10 x 2 bytes = 720
    assert modality_pixels(ds, 0, max_decoded_bytes=720).shape == (12, 10)
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(ds, 16, max_decoded_bytes=719)
    assert info.value.reason == "too_large"
    ds.Rows = ds.Columns = 65535  # 4.3 Gpixel frame: refused whatever the byte limit
    with pytest.raises(DicomDecodeError) as info:
        modality_pixels(ds, 0, max_decoded_bytes=1 << 62)
    assert info.value.reason == "too_large"
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            decode_dicom(ds, 16, max_decoded_bytes=bad)


def test_deflate_bomb_is_too_large():
    ds = enhanced_ct(np.zeros((8, 512, 512), np.int16), per_frame=[(1, 0)] * 8)  # 4 MiB of zeros
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    raw = _to_bytes(ds)
    assert len(raw) < 64 << 10
    with pytest.raises(DicomDecodeError) as info:
        read_dataset(raw, max_file_bytes=1 << 20)
    assert info.value.reason == "too_large"
    assert read_dataset(raw, max_file_bytes=8 << 20).NumberOfFrames == 8
    with pytest.raises(DicomDecodeError) as info:  # a deflate stream that stops early
        read_dataset(raw[:-200])
    assert info.value.reason == "truncated"


def test_codestream_larger_than_header_is_refused_before_decoding():
    raw = bytearray(harness.bundled_file("MR_small_jp2klossless.dcm").read_bytes())
    siz = raw.find(b"\xff\x4f\xff\x51")
    raw[siz + 8 : siz + 12] = (1 << 30).to_bytes(4, "big")  # Xsiz: a billion columns
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(bytes(raw), 16)
    assert info.value.reason == "decode_failed"
    raw = bytearray(harness.bundled_file("SC_rgb_jpeg_gdcm.dcm").read_bytes())
    sof = raw.find(b"\xff\xc3")
    raw[sof + 5 : sof + 9] = b"\xff\xff\xff\xff"  # 65535 x 65535
    with pytest.raises(DicomDecodeError) as info:
        decode_dicom(bytes(raw), 16)
    assert info.value.reason == "decode_failed"
