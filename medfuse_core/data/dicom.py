"""DICOM decoding into model-ready grayscale images.

Pixel pipeline (:func:`decode_dicom`), in this order:

1. **Decode** the stored values of one frame (native or compressed transfer syntax,
   through pydicom 3's decoders and the installed pylibjpeg plugins). Colour images
   (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its LUT) become
   grayscale luminance ``0.299 R + 0.587 G + 0.114 B``.
2. **Modality LUT**: ``RescaleSlope * stored + RescaleIntercept`` (or a Modality LUT
   Sequence), via ``pydicom.pixels.apply_modality_lut``; an enhanced object's per-frame or
   shared functional-group rescale takes precedence. :func:`modality_pixels` stops here.
3. **VOI window** (only when ``apply_voi=True``): WindowCenter/WindowWidth or a VOI LUT
   Sequence via ``pydicom.pixels.apply_voi_lut``. Missing or invalid window values
   (e.g. width < 1) leave the image unwindowed rather than failing it.
4. **MONOCHROME1 inversion** (``x -> max + min - x``) so that higher always means
   brighter; a MONOCHROME1 image and its inverted MONOCHROME2 twin decode identically.
5. **Resize**, aspect preserving: the longer side is scaled to ``size`` by area averaging
   (OpenCV ``INTER_AREA`` over whole blocks when both factors are integers, else the
   adaptive windows of ``torch.nn.functional.interpolate(mode="area")``; bilinear when
   enlarging); the image is later centred on a ``size x size`` canvas (letterbox), so
   anatomy is never stretched.
6. **Normalise** the resized image robustly to [0, 1]: clip to its 0.5th/99.5th
   percentiles, then min-max. A constant image becomes all zeros (no division by zero).
   The letterbox padding is added after normalisation and is 0 (black).

Order and speed: a linear modality LUT (rescale slope/intercept, from the functional groups
or not) and the MONOCHROME1 inversion commute with the resize (each output pixel is a
weighted mean of input pixels), so for 8/16-bit integer grayscale frames without a VOI
window they are applied after resizing the stored values: the same image up to float
rounding, with no full-size float64 or float32 image. A Modality LUT Sequence, a VOI
window (``apply_voi=True``), colour, float or 32-bit pixel data, and a rescale that
overflows float32 keep steps 2-5 in the order above, at full size. Native pixel data is
decoded as a view on the dataset's bytes (never modified), and pydicom's unused-bits
correction (Bits Stored < Bits Allocated) is applied only when a value has such a bit set.

Errors: every failure raises :class:`DicomDecodeError` with a stable ``reason`` code
(see :data:`REASON_CODES`). Its message is generic by design: it never contains header
values, file paths or pixel data, and the original exception is not chained into the
traceback (only its class name is kept in ``.cause``), because decode errors end up in
logs. pydicom's warnings and log records (which echo values and paths) are suppressed
while these functions run.

Truncation: pydicom reads a file that ends early without complaint, so :func:`read_dataset`
watches for short reads while parsing; an empty dataset, a deflate stream that stops early,
native pixel data shorter than the header declares, encapsulated pixel data with fewer fragments than frames, or an image
header (Rows/Columns) without pixel data in an object whose SOP class is not a known
non-image class also count as ``truncated``.

Non-image objects: a dataset without pixel data is ``no_pixel_data`` when it has no image
header (structured reports, RT plans, waveforms, DICOMDIRs, ...) or when its SOP class is a
known non-image storage class (:func:`is_image_sop_class` is False).

Limits (checked before anything is allocated, failing with ``too_large``): the file size
(``max_file_bytes``, also bounding the inflated size of a deflated dataset) and the declared
pixel geometry, rows x columns x samples x bytes per sample x frames (``max_decoded_bytes``),
plus :data:`MAX_PIXELS_PER_FRAME` and :data:`MAX_FRAMES`. A compressed frame whose codestream
header (JPEG SOF / JPEG-LS / JPEG 2000 SIZ) declares more samples than the DICOM header is
refused (``decode_failed``) before the codec allocates for it.

Multi-frame: :func:`frame_indices` picks the frames that become training images
(:data:`FRAME_POLICIES`); each is decoded with ``decode_dicom(ds, ..., frame=i)``.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Union

import cv2
import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000TransferSyntaxes,
    JPEGLSTransferSyntaxes,
    JPEGTransferSyntaxes,
)

from medfuse_core.data.pydicom_quiet import quiet_pydicom

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_FILE_BYTES",
    "FRAME_POLICIES",
    "MAX_FRAMES",
    "MAX_PIXELS_PER_FRAME",
    "REASON_CODES",
    "DecodedImage",
    "DicomDecodeError",
    "decode_dicom",
    "frame_indices",
    "is_image_sop_class",
    "modality_pixels",
    "read_dataset",
]

REASON_CODES: dict[str, str] = {
    "unreadable": "not a DICOM file or the header cannot be parsed",
    "truncated": "the file ends early or the pixel data is shorter than the header declares",
    "no_pixel_data": "the object holds no image (e.g. a structured report or an RT plan)",
    "unsupported_transfer_syntax": "no installed decoder handles the transfer syntax",
    "decode_failed": "the pixel decoder failed on the pixel data",
    "bad_shape": "empty, impossible or unsupported image dimensions",
    "bad_frame": "the requested frame index is outside the image's frames",
    "io_error": "the file could not be opened or read (missing, permissions, I/O)",
    "too_large": "the file or its declared image size exceeds the configured limit",
}

# Declared pixel bytes (all frames, as decoded) above which an object is refused unread.
DEFAULT_MAX_DECODED_BYTES = 512 << 20
# File size (and inflated size of a deflated dataset) above which a file is refused.
DEFAULT_MAX_FILE_BYTES = 1 << 30
# Hard caps whatever the byte limits say: pixels per frame (about 134 Mpixel) and frames.
MAX_PIXELS_PER_FRAME = 1 << 27
MAX_FRAMES = 1 << 16
# Frame selection policies understood by :func:`frame_indices`.
FRAME_POLICIES: tuple[str, ...] = ("first", "middle", "all")
# pydicom's chunk size when scanning for an undefined-length delimiter; a short read of
# exactly this size is its normal end-of-file probe (it reports a missing delimiter itself).
_PYDICOM_SCAN_CHUNK = 8192
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_COLOR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420", "PALETTE COLOR")

Source = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]


class DicomDecodeError(Exception):
    """Typed decode failure.

    ``reason`` is a key of :data:`REASON_CODES`; ``cause`` is the class name of the
    underlying exception (or None). ``str(exc)`` never holds patient data or paths.
    """

    def __init__(self, reason: str, cause: str | None = None):
        if reason not in REASON_CODES:
            reason = "decode_failed"
        self.reason = reason
        self.cause = cause
        super().__init__(f"DICOM decode failed [{reason}]: {REASON_CODES[reason]}")

    def __reduce__(self):  # keep reason/cause across pickling (Ray, multiprocessing)
        return (DicomDecodeError, (self.reason, self.cause))


@dataclass
class DecodedImage:
    """A decoded, model-ready image and the header fields ingest needs."""

    pixels: np.ndarray  # float32 [size, size] in [0, 1]; higher = brighter
    modality: str | None
    view_position: str | None  # upper-case ViewPosition ("PA", "AP", "LATERAL", ...)
    photometric: str | None
    transfer_syntax: str | None  # UID string
    n_frames: int
    frame: int = 0  # index of the decoded frame


# Never converted into a DicomDecodeError. Everything else is, including BaseException
# subclasses raised by native plugins (pylibjpeg-rle turns Rust panics into pyo3's
# PanicException, which ``except Exception`` does not catch).
_FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


def _fail(reason: str, exc: BaseException | None = None) -> DicomDecodeError:
    return DicomDecodeError(reason, type(exc).__name__ if exc is not None else None)


def _positive_limit(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer")
    return int(value)


# --------------------------------------------------------------------------- reading


class _TrackingReader(io.BytesIO):
    """BytesIO that remembers whether any read came back shorter than requested."""

    short_read = False

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().read(n)
        if n is not None and n > 0 and 0 < len(data) < n and n != _PYDICOM_SCAN_CHUNK:
            self.short_read = True
        return data


def _load_bytes(source: Source, limit: int) -> bytes:
    """The whole source, refusing ("too_large") more than ``limit`` bytes before reading them."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if memoryview(source).nbytes > limit:
            raise _fail("too_large")
        return bytes(source)
    if hasattr(source, "read"):
        data = source.read(limit + 1)  # type: ignore[union-attr]
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("file-like source must be opened in binary mode")
    else:
        with open(os.fspath(source), "rb") as fh:  # type: ignore[arg-type]
            st_size = os.fstat(fh.fileno()).st_size
            if st_size > limit:
                raise _fail("too_large")
            data = _read_bounded(fh, st_size, limit)
    if len(data) > limit:
        raise _fail("too_large")
    return bytes(data)


def _read_bounded(fh: BinaryIO, size: int, limit: int) -> bytes:
    """The rest of an open file found to hold ``size`` bytes, at most ``limit`` + 1 of them.

    Asks for ``size`` + 1 bytes, not ``limit`` + 1: a read of ``limit`` + 1 bytes makes the reader
    allocate that much up front (1 GiB by default) for every file.
    """
    data = fh.read(min(size, limit) + 1)
    if size < len(data) <= limit:  # the file grew after fstat: read on, up to the limit
        data += fh.read(limit + 1 - len(data))
    return data


def _looks_like_raw_dataset(raw: bytes) -> bool:
    """A preamble-less file that starts with a plausible group 0002/0008 tag (either endian)."""
    if len(raw) < 8:
        return False
    for order in ("little", "big"):
        group = int.from_bytes(raw[0:2], order)  # type: ignore[arg-type]
        elem = int.from_bytes(raw[2:4], order)  # type: ignore[arg-type]
        if group in (0x0002, 0x0008) and elem < 0x1000:
            return True
    return False


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}


def _file_meta_end(raw: bytes) -> tuple[int, bytes]:
    """(offset after the explicit-VR-LE file meta group, its raw TransferSyntaxUID value)."""
    pos = 132 if raw[128:132] == b"DICM" else 0
    tsyntax = b""
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        if raw[pos + 4 : pos + 6] in _LONG_VRS:
            if pos + 12 > len(raw):
                break
            header, length = 12, struct.unpack_from("<I", raw, pos + 8)[0]
        else:
            header, length = 8, struct.unpack_from("<H", raw, pos + 6)[0]
        if elem == 0x0010:
            tsyntax = raw[pos + header : pos + header + length]
        pos += header + length
    return pos, tsyntax


def _check_deflated(raw: bytes, limit: int) -> None:
    """pydicom inflates a deflated dataset in one go: refuse one that would exceed ``limit``
    ("too_large"), and call a deflate stream that stops early "truncated"."""
    end, tsyntax = _file_meta_end(raw)
    if tsyntax.rstrip(b"\x00 ").decode("ascii", "replace") != DeflatedExplicitVRLittleEndian:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(raw[end:], limit + 1)
    except zlib.error:
        return  # corrupt stream: pydicom fails on it and the failure is classified there
    if len(inflated) > limit:
        raise _fail("too_large")
    if not inflater.eof:
        raise _fail("truncated")


class _TrackingFile:
    """Read-only window on an open file for pydicom, the file twin of :class:`_TrackingReader`.

    Remembers a short read (as :class:`_TrackingReader` does) and an ``OSError`` from the file,
    and never asks the file for more than the ``size`` bytes it was found to hold: an element
    that declares 4 GiB in a 2 MB file would otherwise make the buffered reader allocate 4 GiB.
    Seeking and reading past ``size`` behave as on a BytesIO of the file's bytes.
    """

    def __init__(self, fh: BinaryIO, size: int):
        self._fh, self._size, self._pos = fh, size, 0
        self.short_read = False
        self.io_error: OSError | None = None
        self.seek(0)

    def read(self, n: int | None = -1) -> bytes:
        avail = max(0, self._size - self._pos)
        want = avail if n is None or n < 0 else n
        try:
            data = self._fh.read(min(want, avail)) if want and avail else b""
        except OSError as exc:
            self.io_error = exc
            raise
        self._pos += len(data)
        if n is not None and n > 0 and 0 < len(data) < n and n != _PYDICOM_SCAN_CHUNK:
            self.short_read = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek value")
        try:
            self._fh.seek(base + offset)
        except OSError as exc:
            self.io_error = exc
            raise
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


# Files at least this large are parsed straight from the file (one copy of the pixel data, not
# two); smaller ones, and any whose meta group names the deflated syntax, are read whole first.
_DIRECT_READ_MIN = 1 << 20
_HEAD_BYTES = 1 << 16


def _parse(reader: _TrackingReader | _TrackingFile, force: bool) -> tuple[Dataset, bool, bool]:
    """dcmread from a tracking reader; returns (dataset, short_read, eof_warning)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(reader, force=force)
    eof_warning = any("end of file" in str(w.message).lower() for w in caught)
    return ds, reader.short_read, eof_warning


def _parse_checked(make_reader, head: bytes) -> Dataset:
    """Parse (retrying with force for a preamble-less raw dataset) and classify failures."""
    readers: list = []

    def parse(force: bool):
        readers.append(make_reader())
        return _parse(readers[-1], force)

    try:
        try:
            ds, short, eof = parse(force=False)
        except InvalidDicomError:
            if not _looks_like_raw_dataset(head):
                raise
            ds, short, eof = parse(force=True)
    except InvalidDicomError as exc:
        raise _fail("unreadable", exc) from None
    except (EOFError, OSError) as exc:
        io_error = any(getattr(r, "io_error", None) is not None for r in readers)
        raise _fail("io_error" if io_error else "truncated", exc) from None
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - pydicom raises many types on garbage
        if any(getattr(r, "io_error", None) is not None for r in readers):
            raise _fail("io_error", exc) from None
        raise _fail("unreadable", exc) from None
    if short or eof:
        raise _fail("truncated")
    if len(ds) == 0:
        # File meta only (or nothing): the main dataset is missing.
        raise _fail("truncated" if len(getattr(ds, "file_meta", None) or ()) else "unreadable")
    _ensure_transfer_syntax(ds)
    return ds


def _read_memory(raw: bytes, limit: int) -> Dataset:
    if not raw:
        raise _fail("unreadable")
    try:
        _check_deflated(raw, limit)
    except DicomDecodeError:
        raise
    except Exception:  # noqa: BLE001 - a malformed meta group: leave it to pydicom
        pass
    return _parse_checked(lambda: _TrackingReader(raw), raw[:_HEAD_BYTES])


def _needs_whole_read(head: bytes) -> bool:
    """The file must be read whole first: its meta group names the deflated syntax (checked and
    inflated in memory), or does not end within ``head``, or cannot be parsed here."""
    try:
        end, tsyntax = _file_meta_end(head)
        deflated = tsyntax.rstrip(b"\x00 ").decode("ascii", "replace") == DeflatedExplicitVRLittleEndian
    except Exception:  # noqa: BLE001 - a malformed meta group: the in-memory path classifies it
        return True
    return deflated or end >= len(head)


def _read_path(path: str, limit: int) -> Dataset:
    """A large file is parsed from the file itself (its pixel data copied once, into the Dataset);
    others go through :func:`_read_memory` exactly as bytes would."""
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise _fail("io_error", exc) from None
    with fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            if size > limit:
                raise _fail("too_large")
            head = fh.read(min(size, _HEAD_BYTES)) if size >= _DIRECT_READ_MIN else b""
            whole = len(head) < _HEAD_BYTES or _needs_whole_read(head)
            if whole:
                fh.seek(0)
                raw = _read_bounded(fh, size, limit)
                if len(raw) > limit:
                    raise _fail("too_large")
        except DicomDecodeError:
            raise
        except OSError as exc:
            raise _fail("io_error", exc) from None
        if whole:
            return _read_memory(raw, limit)
        ds = _parse_checked(lambda: _TrackingFile(fh, size), head)
    if isinstance(ds, pydicom.dataset.FileDataset):
        ds.buffer = None  # the closed file's wrapper: nothing to re-read, and not picklable
    return ds


def read_dataset(source: Source, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Dataset:
    """Parse a DICOM file (path, bytes or binary file object) into a pydicom Dataset.

    The whole file is read (no deferred values). A path to a file of 1 MiB or more is parsed
    from the file itself, so that its pixel data is copied once (into the Dataset); smaller
    files, deflated ones, bytes and file objects are read into memory first. Raises
    :class:`DicomDecodeError` with reason "unreadable", "truncated", "io_error" or
    "too_large" (file, or inflated deflate dataset, larger than ``max_file_bytes``).
    """
    limit = _positive_limit(max_file_bytes, "max_file_bytes")
    with quiet_pydicom():
        if isinstance(source, (str, os.PathLike)):
            return _read_path(os.fspath(source), limit)
        try:
            raw = _load_bytes(source, limit)
        except DicomDecodeError:
            raise
        except OSError as exc:
            raise _fail("io_error", exc) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a text-mode file object
            raise _fail("unreadable", exc) from None
        return _read_memory(raw, limit)


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a meta-less dataset (read with force) the transfer syntax it was read with."""
    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit is None:
        return
    if implicit:
        uid = ImplicitVRLittleEndian
    else:
        uid = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if meta is None:
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid


# --------------------------------------------------------------------------- pixels


def _header_str(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - malformed element value
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


# Storage SOP classes that carry pixel data although "Image Storage" is not in their name.
_IMAGE_SOP_CLASSES_WITHOUT_IMAGE_IN_NAME = frozenset({
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.66.7",  # Label Map Segmentation
    "1.2.840.10008.5.1.4.1.1.66.8",  # Height Map Segmentation
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.77.1.5.8",  # Ophthalmic OCT B-scan Volume Analysis
    "1.2.840.10008.5.1.4.1.1.81.1",  # Ophthalmic Thickness Map
    "1.2.840.10008.5.1.4.1.1.82.1",  # Corneal Topography Map
    "1.2.840.10008.5.1.4.1.1.501.4",  # DICOS 2D AIT
    "1.2.840.10008.5.1.4.1.1.501.5",  # DICOS 3D AIT
})


def is_image_sop_class(uid: str | None) -> bool | None:
    """True for a storage SOP class that carries pixel data, False for a known non-image one
    (structured reports, RT plans/structures, waveforms, presentation states, encapsulated
    documents, DICOMDIR, ...), None when the UID is unknown to pydicom's registry."""
    if not uid:
        return None
    try:
        with quiet_pydicom():  # pydicom warns about malformed UIDs, echoing the value
            sop = UID(str(uid).strip())
            name = sop.name
            if sop.type != "SOP Class" or "Storage" not in name or "Commitment" in name:
                return None
    except Exception:  # noqa: BLE001 - malformed UID value
        return None
    return "Image Storage" in name or str(sop) in _IMAGE_SOP_CLASSES_WITHOUT_IMAGE_IN_NAME


def _missing_pixels_reason(ds: Dataset) -> str:
    """Why a dataset without pixel data has no image: a non-image object, or a cut-off image."""
    if not ("Rows" in ds or "Columns" in ds):
        return "no_pixel_data"  # no image header at all (SR, RT plan, waveform, stripped object)
    meta = getattr(ds, "file_meta", None)
    sop = _header_str(ds, "SOPClassUID") or (_header_str(meta, "MediaStorageSOPClassUID") if meta else None)
    # An image header whose pixel data never arrived is a cut-off file, unless the SOP class
    # says the object never holds pixels.
    return "no_pixel_data" if is_image_sop_class(sop) is False else "truncated"


def _pixel_keyword(ds: Dataset) -> str | None:
    """The pixel data element present with a non-empty value, if any."""
    for keyword in _PIXEL_KEYWORDS:
        if keyword in ds:
            try:
                value = ds[keyword].value
            except Exception as exc:  # noqa: BLE001 - undecodable element
                raise _fail("decode_failed", exc) from None
            if value is not None and len(value) > 0:
                return keyword
    return None


def _n_frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent); "bad_shape" if invalid, "too_large" above MAX_FRAMES."""
    try:
        value = ds.get("NumberOfFrames")
        n = int(value) if value not in (None, "") else 1
    except Exception as exc:  # noqa: BLE001
        raise _fail("bad_shape", exc) from None
    if n < 1:
        raise _fail("bad_shape")
    if n > MAX_FRAMES:
        raise _fail("too_large")
    return n


def _geometry(ds: Dataset, max_decoded_bytes: int) -> tuple[int, int, int, int]:
    """(rows, columns, samples_per_pixel, n_frames), validated against the limits.

    "bad_shape" for missing or impossible values, "too_large" when rows x columns x samples
    x bytes per sample x frames exceeds ``max_decoded_bytes`` (nothing is allocated here).
    """
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
    except Exception as exc:  # noqa: BLE001 - missing or malformed dims
        raise _fail("bad_shape", exc) from None
    n_frames = _n_frames(ds)
    if rows < 1 or cols < 1 or spp not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise _fail("bad_shape")
    if rows * cols > MAX_PIXELS_PER_FRAME:
        raise _fail("too_large")
    if rows * cols * spp * max(1, bits // 8) * n_frames > max_decoded_bytes:
        raise _fail("too_large")
    return rows, cols, spp, n_frames


def _transfer_syntax(ds: Dataset) -> UID | None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return None
    uid = meta.get("TransferSyntaxUID")
    return UID(str(uid)) if uid else None


def _luminance(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.float32, copy=False)
    return 0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]


# --------------------------------------------------------------------------- encapsulated


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}
_CODESTREAM_SCAN = 1 << 16  # header bytes searched for the size marker


def _count_fragments(data: bytes) -> int:
    """Fragments after the Basic Offset Table; "truncated" when an item runs past the end."""
    pos, count, end = 0, 0, len(data)
    first = True
    while pos + 8 <= end:
        tag, length = struct.unpack_from("<II", data, pos)
        if tag == 0xE0DDFFFE:  # sequence delimiter (FFFE,E0DD)
            break
        if tag != 0xE000FFFE or length == 0xFFFFFFFF:  # not an item (FFFE,E000)
            raise _fail("decode_failed")
        pos += 8 + length
        if pos > end:
            raise _fail("truncated")
        if not first:
            count += 1
        first = False
    return count


def _codestream_size(frame: bytes, tsyntax: UID) -> tuple[int, int, int] | None:
    """(rows, columns, components) from a JPEG / JPEG-LS SOF or JPEG 2000 SIZ marker."""
    head = bytes(frame[:_CODESTREAM_SCAN])
    if tsyntax in JPEG2000TransferSyntaxes:
        at = head.find(b"\xff\x4f\xff\x51")  # SOC then SIZ (also inside a JP2 wrapper)
        if at < 0 or at + 42 > len(head):
            return None
        xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", head, at + 8)
        return max(0, ysiz - yo), max(0, xsiz - xo), struct.unpack_from(">H", head, at + 40)[0]
    if head[:2] != b"\xff\xd8":
        return None
    pos = 2
    while pos + 4 <= len(head):
        if head[pos] != 0xFF:
            return None
        marker = head[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            if pos + 10 > len(head):
                return None
            height, width, comps = struct.unpack_from(">HHB", head, pos + 5)
            return height, width, comps
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            pos += 2
            continue
        length = struct.unpack_from(">H", head, pos + 2)[0]
        if length < 2:
            return None
        pos += 2 + length
    return None


def _check_encapsulated(ds: Dataset, tsyntax: UID, frame: int, n_frames: int, rows: int, cols: int, spp: int) -> None:
    """Fragments cover the declared frames, and the frame's codestream is no larger than declared."""
    data = ds.PixelData
    if _count_fragments(data) < n_frames:
        raise _fail("truncated")
    if tsyntax not in JPEG2000TransferSyntaxes and tsyntax not in JPEGLSTransferSyntaxes \
            and tsyntax not in JPEGTransferSyntaxes:
        return
    eot = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        eot = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        encoded = get_frame(data, frame, number_of_frames=n_frames, extended_offsets=eot)
    except Exception as exc:  # noqa: BLE001 - the decoder would fail the same way
        raise _fail("decode_failed", exc) from None
    size = _codestream_size(encoded, tsyntax)
    if size is None:
        return
    c_rows, c_cols, comps = size
    if (c_rows or rows) * c_cols * comps > rows * cols * spp:
        raise _fail("decode_failed")  # the codec would allocate for a larger image than declared


# --------------------------------------------------------------------------- modality LUT


def _frame_rescale(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) from the frame's Per-Frame, else the Shared, Functional Groups."""
    for keyword, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(keyword)
        if not groups or index >= len(groups):
            continue
        transform = groups[index].get("PixelValueTransformationSequence")
        if not transform:
            continue
        item = transform[0]
        slope, intercept = item.get("RescaleSlope"), item.get("RescaleIntercept")
        if slope in (None, "") and intercept in (None, ""):
            continue
        return (
            float(slope) if slope not in (None, "") else 1.0,
            float(intercept) if intercept not in (None, "") else 0.0,
        )
    return None


def _modality_lut(arr: np.ndarray, ds: Dataset, frame: int) -> np.ndarray:
    rescale = _frame_rescale(ds, frame)
    if rescale is not None:
        slope, intercept = rescale
        return arr.astype(np.float64) * slope + intercept
    return apply_modality_lut(arr, ds)


# Transfer syntaxes whose decoded values pydicom corrects for unused high bits (Bits Stored <
# Bits Allocated): all but JPEG 2000 and JPEG-LS, which get a sign correction instead. For these
# the correction is done here, and skipped when no value has a bit set outside Bits Stored.
def _own_bit_correction(tsyntax: UID) -> bool:
    return tsyntax not in JPEG2000TransferSyntaxes and tsyntax not in JPEGLSTransferSyntaxes


def _correct_unused_bits(arr: np.ndarray, props: dict, keyword: str) -> np.ndarray:
    """pydicom's unused-bits correction (shift left then right by Bits Allocated - Bits Stored),
    on a new array and only when some value actually has a bit set outside Bits Stored."""
    try:
        allocated, stored = int(props["bits_allocated"]), int(props["bits_stored"])
    except Exception:  # noqa: BLE001 - pydicom validated these; nothing to correct without them
        return arr
    if keyword != "PixelData" or arr.dtype.kind not in "iu" or not 0 < stored < allocated:
        return arr
    if arr.dtype.kind == "u":
        if int(arr.max()) < (1 << stored):
            return arr
    elif -(1 << (stored - 1)) <= int(arr.min()) and int(arr.max()) < (1 << (stored - 1)):
        return arr
    shift = allocated - stored
    out = np.left_shift(arr, shift)  # a new array: ``arr`` may be a view on the dataset's bytes
    np.right_shift(out, shift, out=out)
    return out


def _decode_frame(ds: Dataset, frame: int, max_decoded_bytes: int) -> tuple[np.ndarray, int, str]:
    """The validated, decoded stored values of one frame: (array, samples per pixel, photometric).

    For native transfer syntaxes the array may be a read-only view on the dataset's pixel bytes.
    """
    keyword = _pixel_keyword(ds)
    if keyword is None:
        raise _fail(_missing_pixels_reason(ds))
    rows, cols, spp, n_frames = _geometry(ds, max_decoded_bytes)
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < n_frames:
        raise _fail("bad_frame")
    frame = int(frame)

    tsyntax = _transfer_syntax(ds)
    if tsyntax is None:
        raise _fail("unsupported_transfer_syntax")
    try:
        decoder = get_decoder(tsyntax)
    except Exception as exc:  # noqa: BLE001 - NotImplementedError for unknown syntaxes
        raise _fail("unsupported_transfer_syntax", exc) from None
    if not decoder.is_available:
        raise _fail("unsupported_transfer_syntax")

    if tsyntax.is_encapsulated:
        if keyword != "PixelData":
            raise _fail("decode_failed")
        _check_encapsulated(ds, tsyntax, frame, n_frames, rows, cols, spp)
    else:
        try:
            expected = get_expected_length(ds, "bytes")
            actual = len(ds[keyword].value)
        except Exception as exc:  # noqa: BLE001
            raise _fail("bad_shape", exc) from None
        if actual < expected:
            raise _fail("truncated")

    # A view (no copy) of native data, and the unused-bits correction only where it changes
    # something: the same values as pydicom's defaults, without two full-image passes.
    own_bits = _own_bit_correction(tsyntax)
    options = {"correct_unused_bits": False} if own_bits else {}
    if not tsyntax.is_encapsulated:
        options["view_only"] = True
    try:
        arr, props = decoder.as_array(ds, index=frame, **options)
    except DicomDecodeError:
        raise
    except _FATAL:
        raise
    except BaseException as exc:  # noqa: BLE001 - plugin errors come in many types, Rust panics too
        raise _fail("decode_failed", exc) from None

    if arr.size == 0:
        raise _fail("bad_shape")
    if own_bits:
        arr = _correct_unused_bits(arr, props, keyword)
    photometric = (_header_str(ds, "PhotometricInterpretation") or "").upper()
    if spp == 3:
        if arr.ndim != 3 or arr.shape[-1] != 3:
            raise _fail("bad_shape")
    elif arr.ndim != 2:
        raise _fail("bad_shape")
    return arr, spp, photometric


def _to_modality(arr: np.ndarray, ds: Dataset, frame: int, spp: int, photometric: str) -> np.ndarray:
    """Decoded stored values -> float32 modality values (or luminance), at full size."""
    try:
        if spp == 3:
            return _luminance(arr)
        if photometric == "PALETTE COLOR":
            return _luminance(apply_color_lut(arr, ds))
        out = _modality_lut(arr, ds, frame)
    except DicomDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUT / rescale values
        raise _fail("decode_failed", exc) from None
    out = np.asarray(out, dtype=np.float32)
    return out if out.flags.writeable else out.copy()  # never hand out a view on the dataset


def _modality_pixels(ds: Dataset, frame: int, max_decoded_bytes: int) -> np.ndarray:
    arr, spp, photometric = _decode_frame(ds, frame, max_decoded_bytes)
    return _to_modality(arr, ds, int(frame), spp, photometric)


def modality_pixels(ds: Dataset, frame: int = 0, *, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> np.ndarray:
    """Decode one frame and apply the modality LUT; returns a float32 2-D array.

    Values are in modality units (e.g. Hounsfield units for CT): stored values times
    RescaleSlope plus RescaleIntercept, taken per frame from the functional groups of an
    enhanced multi-frame object. Colour images come back as luminance.
    Raises :class:`DicomDecodeError` (``too_large`` above ``max_decoded_bytes``).
    """
    limit = _positive_limit(max_decoded_bytes, "max_decoded_bytes")
    with quiet_pydicom():
        try:
            return _modality_pixels(ds, frame, limit)
        except DicomDecodeError:
            raise
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - never let a raw exception escape
            raise _fail("decode_failed", exc) from None


def frame_indices(ds: Dataset, policy: str = "first") -> list[int]:
    """Indices of the frames that become training images under ``policy``.

    With n = NumberOfFrames (1 when absent): "first" -> [0]; "middle" -> [n // 2];
    "all" -> [0, ..., n - 1]. Never empty, so a non-image object still yields one decode
    attempt (and its reason). ``ValueError`` for a policy not in :data:`FRAME_POLICIES`;
    :class:`DicomDecodeError` "bad_shape" for an invalid NumberOfFrames, "too_large"
    above :data:`MAX_FRAMES`.
    """
    if policy not in FRAME_POLICIES:
        raise ValueError(f"unknown frame policy; expected one of {FRAME_POLICIES}")
    with quiet_pydicom():
        n = _n_frames(ds)
    if policy == "first":
        return [0]
    if policy == "middle":
        return [n // 2]
    return list(range(n))


# --------------------------------------------------------------------------- display


def _apply_voi(x: np.ndarray, ds: Dataset) -> np.ndarray:
    has_window = "WindowCenter" in ds and "WindowWidth" in ds
    if not has_window and "VOILUTSequence" not in ds:
        return x
    try:
        out = np.asarray(apply_voi_lut(x, ds, index=0, prefer_lut=True), dtype=np.float32)
    except Exception:  # noqa: BLE001 - invalid window values: keep the unwindowed image
        return x
    return out if np.isfinite(out).all() else x


def _fit_shape(h: int, w: int, size: int) -> tuple[int, int]:
    """Output (rows, columns) with the longer side ``size``, aspect preserved."""
    scale = size / max(h, w)
    return min(size, max(1, int(round(h * scale)))), min(size, max(1, int(round(w * scale))))


# Pixels per strip when an integer-factor area reduction converts to float32 strip by strip
# (a cache-sized buffer instead of a full-size float32 copy of the image).
_STRIP_PIXELS = 1 << 17


def _area_integer(x: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """Box average over whole ``h/new_h`` x ``w/new_w`` blocks (both integers), float32 out."""
    h, w = x.shape
    ky = h // new_h
    if x.dtype == np.float32:
        return cv2.resize(x, (new_w, new_h), interpolation=cv2.INTER_AREA)
    out = np.empty((new_h, new_w), dtype=np.float32)
    per = max(1, _STRIP_PIXELS // (ky * w))  # output rows per strip
    buf = np.empty((per * ky, w), dtype=np.float32)
    for r in range(0, new_h, per):
        n = min(per, new_h - r)
        strip = buf[: n * ky]
        np.copyto(strip, x[r * ky : (r + n) * ky], casting="unsafe")
        out[r : r + n] = cv2.resize(strip, (new_w, n), interpolation=cv2.INTER_AREA)
    return out


def _resize_fit(x: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longer side equals ``size`` (aspect preserved); float32 out.

    Shrinking averages pixel areas: over whole blocks (OpenCV's INTER_AREA, converting to float32
    strip by strip) when both factors are integers, else over the adaptive-pooling windows of
    ``torch.nn.functional.interpolate(mode="area")``. Enlarging is bilinear. Values are linear
    combinations of the input with non-negative weights summing to 1, so the resize commutes
    with any affine map of the values (a rescale slope/intercept, the MONOCHROME1 inversion).
    """
    h, w = x.shape
    new_h, new_w = _fit_shape(h, w, size)
    if (new_h, new_w) == (h, w):
        return np.array(x, dtype=np.float32)
    if new_h <= h and new_w <= w:
        if h % new_h == 0 and w % new_w == 0:
            return _area_integer(x, new_h, new_w)
        t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
        return F.interpolate(t, size=(new_h, new_w), mode="area")[0, 0].numpy()
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    out = F.interpolate(t, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return out[0, 0].numpy()


def _normalise(x: np.ndarray) -> np.ndarray:
    """Clip to the 0.5/99.5 percentiles and min-max to [0, 1]; constant -> zeros."""
    lo, hi = np.percentile(x, [0.5, 99.5])
    if not hi > lo:
        lo, hi = float(x.min()), float(x.max())
        if not hi > lo:
            return np.zeros_like(x, dtype=np.float32)
    out = (x - np.float32(lo)) / np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _letterbox(x: np.ndarray, size: int) -> np.ndarray:
    h, w = x.shape
    if (h, w) == (size, size):
        return x
    canvas = np.zeros((size, size), dtype=np.float32)
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, left : left + w] = x
    return canvas


def _has_voi(ds: Dataset) -> bool:
    return ("WindowCenter" in ds and "WindowWidth" in ds) or "VOILUTSequence" in ds


def _linear_modality(ds: Dataset, frame: int) -> tuple[float, float] | None:
    """(slope, intercept) when the frame's modality LUT is linear, None for a Modality LUT
    Sequence or rescale values that are not plain numbers (left to ``_to_modality``)."""
    rescale = _frame_rescale(ds, frame)
    if rescale is not None:
        return rescale
    if ds.get("ModalityLUTSequence"):
        return None
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, intercept = ds.RescaleSlope, ds.RescaleIntercept
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (slope, intercept)):
            return None
        return float(slope), float(intercept)
    return 1.0, 0.0


def _resized_linear(arr: np.ndarray, ds: Dataset, frame: int, size: int, mono1: bool) -> np.ndarray | None:
    """Resize the stored values first, then apply the linear modality LUT and the MONOCHROME1
    inversion to the small image: they commute with the area/bilinear resize, so this equals
    LUT -> invert -> resize (up to float rounding) without full-size float work. None when the
    frame does not qualify (not 8/16-bit integers, a non-linear LUT, non-finite results)."""
    if arr.ndim != 2 or arr.dtype.kind not in "iu" or arr.dtype.itemsize > 2:
        return None
    try:
        linear = _linear_modality(ds, frame)
    except Exception as exc:  # noqa: BLE001 - malformed rescale values
        raise _fail("decode_failed", exc) from None
    if linear is None:
        return None
    slope, intercept = linear
    x = _resize_fit(arr, size)
    if (slope, intercept) != (1.0, 0.0):
        with np.errstate(all="ignore"):
            x = (x.astype(np.float64) * slope + intercept).astype(np.float32)
    if not np.isfinite(x).all():
        return None  # overflow: the full-size path replaces non-finite values first
    if mono1:
        x = (x.max() + x.min()) - x
    return x


def _display(ds: Dataset, size: int, apply_voi: bool, frame: int, max_decoded_bytes: int) -> DecodedImage:
    arr, spp, pi = _decode_frame(ds, frame, max_decoded_bytes)
    photometric = _header_str(ds, "PhotometricInterpretation")
    grayscale = pi not in _COLOR
    x = None
    if spp == 1 and grayscale and not (apply_voi and _has_voi(ds)):
        x = _resized_linear(arr, ds, int(frame), size, pi == "MONOCHROME1")
    if x is None:
        # Full-size order: modality LUT, VOI window, non-finite repair, inversion, then resize.
        x = _to_modality(arr, ds, int(frame), spp, pi)
        if apply_voi and grayscale:
            x = _apply_voi(x, ds)
        if not np.isfinite(x).all():
            finite = np.isfinite(x)
            if not finite.any():
                raise _fail("decode_failed")
            x = np.where(finite, x, x[finite].min()).astype(np.float32)
        if pi == "MONOCHROME1":
            x = (x.max() + x.min()) - x
        x = _resize_fit(x, size)
    x = _normalise(x)
    view = _header_str(ds, "ViewPosition")
    tsyntax = _transfer_syntax(ds)
    return DecodedImage(
        pixels=_letterbox(x, size),
        modality=_header_str(ds, "Modality"),
        view_position=view.upper() if view else None,
        photometric=photometric,
        transfer_syntax=str(tsyntax) if tsyntax else None,
        n_frames=_n_frames(ds),
        frame=int(frame),
    )


def decode_dicom(
    source: Source | Dataset,
    size: int,
    apply_voi: bool = False,
    frame: int = 0,
    *,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> DecodedImage:
    """Decode one frame of a DICOM file (path, bytes, file object or Dataset) to a [size, size] image.

    Runs the pipeline in the module docstring: decode, modality LUT, optional VOI window,
    MONOCHROME1 inversion, aspect-preserving resize + letterbox, robust [0, 1] scaling.
    To decode several frames of one file, read it once (:func:`read_dataset`) and pass the
    Dataset with each index from :func:`frame_indices`. Raises :class:`DicomDecodeError` on
    any failure (``too_large`` beyond ``max_file_bytes`` / ``max_decoded_bytes``),
    ``ValueError`` for a bad ``size`` or limit.
    """
    if int(size) < 1:
        raise ValueError("size must be a positive integer")
    size = int(size)
    limit = _positive_limit(max_decoded_bytes, "max_decoded_bytes")
    ds = source if isinstance(source, Dataset) else read_dataset(source, max_file_bytes)
    with quiet_pydicom():
        try:
            return _display(ds, size, apply_voi, frame, limit)
        except DicomDecodeError:
            raise
        except _FATAL:
            raise
        except BaseException as exc:  # noqa: BLE001 - never let a raw exception escape
            raise _fail("decode_failed", exc) from None
