"""DICOM decoding into model-ready grayscale images.

Pixel pipeline (:func:`decode_dicom`), in this order:

1. **Decode** the stored values of one frame (native or compressed transfer syntax,
   through pydicom 3's decoders and the installed pylibjpeg plugins). Colour images
   (RGB, YBR_* converted to RGB by pydicom, PALETTE COLOR through its LUT) become
   grayscale luminance ``0.299 R + 0.587 G + 0.114 B``.
2. **Modality LUT**: ``RescaleSlope * stored + RescaleIntercept`` (or a Modality LUT
   Sequence), via ``pydicom.pixels.apply_modality_lut``. :func:`modality_pixels` stops here.
3. **VOI window** (only when ``apply_voi=True``): WindowCenter/WindowWidth or a VOI LUT
   Sequence via ``pydicom.pixels.apply_voi_lut``. Missing or invalid window values
   (e.g. width < 1) leave the image unwindowed rather than failing it.
4. **MONOCHROME1 inversion** (``x -> max + min - x``) so that higher always means
   brighter; a MONOCHROME1 image and its inverted MONOCHROME2 twin decode identically.
5. **Resize**, aspect preserving: the longer side is scaled to ``size`` with
   ``torch.nn.functional.interpolate`` (bilinear, antialiased); the image is later
   centred on a ``size x size`` canvas (letterbox), so anatomy is never stretched.
6. **Normalise** the resized image robustly to [0, 1]: clip to its 0.5th/99.5th
   percentiles, then min-max. A constant image becomes all zeros (no division by zero).
   The letterbox padding is added after normalisation and is 0 (black).

Errors: every failure raises :class:`DicomDecodeError` with a stable ``reason`` code
(see :data:`REASON_CODES`). Its message is generic by design: it never contains header
values, file paths or pixel data, and the original exception is not chained into the
traceback (only its class name is kept in ``.cause``), because decode errors end up in
logs. pydicom's warnings and log records (which echo values and paths) are suppressed
while these functions run.

Truncation: pydicom reads a file that ends early without complaint, so :func:`read_dataset`
watches for short reads while parsing; an image header (Rows/Columns) without pixel data,
an empty dataset, or native pixel data shorter than the header declares also count as
``truncated``.
"""

from __future__ import annotations

import io
import logging
import os
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Union

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

__all__ = [
    "REASON_CODES",
    "DecodedImage",
    "DicomDecodeError",
    "decode_dicom",
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
}

# A frame larger than this is treated as a corrupt header, not decoded (about 134 Mpixel).
MAX_PIXELS_PER_FRAME = 1 << 27
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


# --------------------------------------------------------------------------- quieting


_quiet_state = threading.local()


class _QuietFilter(logging.Filter):
    """Drops pydicom log records emitted while a decode function runs on this thread."""

    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(_quiet_state, "depth", 0) == 0


_PYDICOM_LOGGER = logging.getLogger("pydicom")
if not any(isinstance(f, _QuietFilter) for f in _PYDICOM_LOGGER.filters):
    _PYDICOM_LOGGER.addFilter(_QuietFilter())


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence pydicom warnings (process-wide) and log records (this thread)."""
    _quiet_state.depth = getattr(_quiet_state, "depth", 0) + 1
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        _quiet_state.depth -= 1


def _fail(reason: str, exc: BaseException | None = None) -> DicomDecodeError:
    return DicomDecodeError(reason, type(exc).__name__ if exc is not None else None)


# --------------------------------------------------------------------------- reading


class _TrackingReader(io.BytesIO):
    """BytesIO that remembers whether any read came back shorter than requested."""

    short_read = False

    def read(self, n: int | None = -1) -> bytes:  # type: ignore[override]
        data = super().read(n)
        if n is not None and n > 0 and 0 < len(data) < n and n != _PYDICOM_SCAN_CHUNK:
            self.short_read = True
        return data


def _load_bytes(source: Source) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if hasattr(source, "read"):
        data = source.read()  # type: ignore[union-attr]
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("file-like source must be opened in binary mode")
        return bytes(data)
    with open(os.fspath(source), "rb") as fh:  # type: ignore[arg-type]
        return fh.read()


def _looks_like_raw_dataset(raw: bytes) -> bool:
    """A preamble-less file that starts with a plausible little-endian group 0002/0008 tag."""
    if len(raw) < 8:
        return False
    group = int.from_bytes(raw[0:2], "little")
    elem = int.from_bytes(raw[2:4], "little")
    return group in (0x0002, 0x0008) and elem < 0x1000


def _parse(raw: bytes, force: bool) -> tuple[Dataset, bool, bool]:
    """dcmread from memory; returns (dataset, short_read, eof_warning)."""
    reader = _TrackingReader(raw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = pydicom.dcmread(reader, force=force)
    eof_warning = any("end of file" in str(w.message).lower() for w in caught)
    return ds, reader.short_read, eof_warning


def read_dataset(source: Source) -> Dataset:
    """Parse a DICOM file (path, bytes or binary file object) into a pydicom Dataset.

    The whole file is read (no deferred values). Raises :class:`DicomDecodeError` with
    reason "unreadable", "truncated" or "io_error".
    """
    with _quiet():
        try:
            raw = _load_bytes(source)
        except OSError as exc:
            raise _fail("io_error", exc) from None
        except Exception as exc:  # noqa: BLE001 - e.g. a text-mode file object
            raise _fail("unreadable", exc) from None
        if not raw:
            raise _fail("unreadable")
        try:
            try:
                ds, short, eof = _parse(raw, force=False)
            except InvalidDicomError:
                if not _looks_like_raw_dataset(raw):
                    raise
                ds, short, eof = _parse(raw, force=True)
        except InvalidDicomError as exc:
            raise _fail("unreadable", exc) from None
        except (EOFError, OSError) as exc:
            raise _fail("truncated", exc) from None
        except Exception as exc:  # noqa: BLE001 - pydicom raises many types on garbage
            raise _fail("unreadable", exc) from None
        if short or eof:
            raise _fail("truncated")
        if len(ds) == 0:
            # File meta only (or nothing): the main dataset is missing.
            raise _fail("truncated" if len(getattr(ds, "file_meta", None) or ()) else "unreadable")
        _ensure_transfer_syntax(ds)
        return ds


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


def _n_frames(ds: Dataset) -> int:
    try:
        value = ds.get("NumberOfFrames")
        n = int(value) if value not in (None, "") else 1
    except Exception as exc:  # noqa: BLE001
        raise _fail("bad_shape", exc) from None
    if n < 1:
        raise _fail("bad_shape")
    return n


def _geometry(ds: Dataset) -> tuple[int, int, int, int]:
    """(rows, columns, samples_per_pixel, n_frames), validated."""
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
    except Exception as exc:  # noqa: BLE001 - missing or malformed dims
        raise _fail("bad_shape", exc) from None
    n_frames = _n_frames(ds)
    if rows < 1 or cols < 1 or rows * cols > MAX_PIXELS_PER_FRAME or spp not in (1, 3):
        raise _fail("bad_shape")
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


def _modality_pixels(ds: Dataset, frame: int) -> np.ndarray:
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        # An image header whose pixel data never arrived is a cut-off file, not an SR.
        raise _fail("truncated" if ("Rows" in ds and "Columns" in ds) else "no_pixel_data")
    rows, cols, spp, n_frames = _geometry(ds)
    if not isinstance(frame, (int, np.integer)) or not 0 <= int(frame) < n_frames:
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

    if "PixelData" in ds and not tsyntax.is_encapsulated:
        try:
            expected = get_expected_length(ds, "bytes")
            actual = len(ds.PixelData)
        except Exception as exc:  # noqa: BLE001
            raise _fail("bad_shape", exc) from None
        if actual < expected:
            raise _fail("truncated")

    try:
        arr, _ = decoder.as_array(ds, index=frame)
    except DicomDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - plugin errors come in many types
        raise _fail("decode_failed", exc) from None

    if arr.size == 0:
        raise _fail("bad_shape")
    photometric = (_header_str(ds, "PhotometricInterpretation") or "").upper()
    try:
        if spp == 3:
            if arr.ndim != 3 or arr.shape[-1] != 3:
                raise _fail("bad_shape")
            return _luminance(arr)
        if arr.ndim != 2:
            raise _fail("bad_shape")
        if photometric == "PALETTE COLOR":
            return _luminance(apply_color_lut(arr, ds))
        out = apply_modality_lut(arr, ds)
    except DicomDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - malformed LUT / rescale values
        raise _fail("decode_failed", exc) from None
    return np.asarray(out, dtype=np.float32)


def modality_pixels(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Decode one frame and apply the modality LUT; returns a float32 2-D array.

    Values are in modality units (e.g. Hounsfield units for CT): stored values times
    RescaleSlope plus RescaleIntercept. Colour images come back as luminance.
    Raises :class:`DicomDecodeError`.
    """
    with _quiet():
        try:
            return _modality_pixels(ds, frame)
        except DicomDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let a raw exception escape
            raise _fail("decode_failed", exc) from None


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


def _resize_fit(x: np.ndarray, size: int) -> np.ndarray:
    """Scale so the longer side equals ``size`` (aspect preserved), bilinear + antialias."""
    h, w = x.shape
    scale = size / max(h, w)
    new_h = min(size, max(1, int(round(h * scale))))
    new_w = min(size, max(1, int(round(w * scale))))
    if (new_h, new_w) == (h, w):
        return x
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


def _display(ds: Dataset, size: int, apply_voi: bool, frame: int) -> DecodedImage:
    x = _modality_pixels(ds, frame)
    photometric = _header_str(ds, "PhotometricInterpretation")
    grayscale = (photometric or "").upper() not in _COLOR
    if apply_voi and grayscale:
        x = _apply_voi(x, ds)
    if not np.isfinite(x).all():
        finite = np.isfinite(x)
        if not finite.any():
            raise _fail("decode_failed")
        x = np.where(finite, x, x[finite].min()).astype(np.float32)
    if (photometric or "").upper() == "MONOCHROME1":
        x = (x.max() + x.min()) - x
    x = _normalise(_resize_fit(x, size))
    view = _header_str(ds, "ViewPosition")
    return DecodedImage(
        pixels=_letterbox(x, size),
        modality=_header_str(ds, "Modality"),
        view_position=view.upper() if view else None,
        photometric=photometric,
        transfer_syntax=str(_transfer_syntax(ds)) if _transfer_syntax(ds) else None,
        n_frames=_n_frames(ds),
    )


def decode_dicom(
    source: Source | Dataset, size: int, apply_voi: bool = False, frame: int = 0
) -> DecodedImage:
    """Decode a DICOM file (path, bytes, file object or Dataset) to a [size, size] image.

    Runs the pipeline in the module docstring: decode, modality LUT, optional VOI window,
    MONOCHROME1 inversion, aspect-preserving resize + letterbox, robust [0, 1] scaling.
    Raises :class:`DicomDecodeError` on any failure, ``ValueError`` for a bad ``size``.
    """
    if int(size) < 1:
        raise ValueError("size must be a positive integer")
    size = int(size)
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    with _quiet():
        try:
            return _display(ds, size, apply_voi, frame)
        except DicomDecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - never let a raw exception escape
            raise _fail("decode_failed", exc) from None
