"""Seeded DICOM mutation fuzzing for :mod:`medfuse_core.data.dicom`.

* :func:`bundled_files` lists pydicom's bundled test data straight from disk (never the
  download path of ``pydicom.data.get_testdata_files``, which fetches pydicom-data online).
* :func:`make_variants` turns valid seed files into a deterministic list of truncated and
  mutated variants (same seed -> byte-identical list).
* :func:`run_variants` decodes each variant in a worker process (spawned, address space
  capped with ``RLIMIT_AS``, killed after a per-file timeout) and records exactly one
  outcome per variant: ``decoded``, ``reason:<code>``, ``crash:<what>``, ``timeout`` or
  ``memory``. Workers decode from a file whose name holds :data:`CANARY_PATH` and every
  seed carries :data:`CANARY` in its text elements; any canary that reaches an exception,
  a traceback, a warning or a log record is reported as a leak. A variant starting with
  :data:`CONTROL` makes the worker fail on purpose, to prove each outcome is detected.

Only the standard library and pydicom are imported at module level, so spawned workers
start quickly and set their thread and memory limits before importing torch.
"""

from __future__ import annotations

import hashlib
import io
import os
import queue
import random
import signal
import struct
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pydicom
from pydicom.data.data_manager import DATA_ROOT
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator

CANARY = "CANARY7731"
CANARY_PATH = "CANARYPATH7731"
SEED = 20250117
DATA_DIRS = ("test_files", "charset_files", "palettes")

# Small, valid files covering the transfer syntaxes and pixel layouts the decoder handles.
PYDICOM_SEEDS = (
    "CT_small.dcm",  # explicit LE, signed 16-bit, rescale
    "MR_small_implicit.dcm",  # implicit LE
    "MR_small_bigendian.dcm",  # explicit BE
    "MR_small_RLE.dcm",  # RLE
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "SC_rgb_jpeg_gdcm.dcm",  # JPEG lossless (process 14), RGB
    "JPGExtended.dcm",  # JPEG extended, 12-bit
    "SC_rgb_dcmtk_+eb+cy+np.dcm",  # JPEG baseline, YBR_FULL_422
    "JPEGLSNearLossless_16.dcm",  # JPEG-LS near-lossless
    "SC_rgb_rle_2frame.dcm",  # multi-frame RLE colour
    "rtdose.dcm",  # 15 frames, 32-bit
    "image_dfl.dcm",  # deflated dataset
    "liver_1frame.dcm",  # 1-bit segmentation
    "examples_palette.dcm",  # PALETTE COLOR
)

OUTCOME_KINDS = ("decoded", "reason", "crash", "timeout", "memory")


def bundled_files(dirs: tuple[str, ...] = DATA_DIRS) -> list[Path]:
    """Every file shipped inside the installed pydicom package's data folders (offline)."""
    root = Path(DATA_ROOT)
    out: list[Path] = []
    for name in dirs:
        out += sorted(p for p in (root / name).rglob("*") if p.is_file() and p.suffix != ".py")
    return out


def bundled_file(name: str) -> Path:
    path = Path(DATA_ROOT) / "test_files" / name
    if not path.is_file():
        raise FileNotFoundError(name)
    return path


# --------------------------------------------------------------------------- seeds


def _with_canary(raw: bytes) -> bytes:
    """Re-encode a file with the canary in its identifying text elements."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.PatientName = f"{CANARY}^PATIENT"
        ds.PatientID = f"PID{CANARY}"
        ds.StudyDescription = f"STUDY {CANARY}"
        ds.InstitutionName = f"HOSPITAL {CANARY}"
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def enhanced_seed() -> bytes:
    """A small Enhanced CT: 3 frames of 16 x 12, a different rescale in each frame's functional group."""
    import numpy as np

    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.Modality, ds.NumberOfFrames, ds.Rows, ds.Columns = "CT", "3", 16, 12
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    groups = []
    for slope, intercept in ((1, -1024), (2, -2048), (0.5, 0)):
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = str(slope), str(intercept), "HU"
        item = Dataset()
        item.PixelValueTransformationSequence = [pvt]
        groups.append(item)
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.PixelData = (np.arange(3 * 16 * 12, dtype="<u2") * 5).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seed_files(include_synth: bool = True) -> tuple[list[tuple[str, bytes]], str]:
    """(name, bytes) of the valid seeds, each carrying the canary; plus a note on the synth seeds."""
    seeds = [(name, _with_canary(bundled_file(name).read_bytes())) for name in PYDICOM_SEEDS]
    seeds.append(("enhanced_ct.dcm", _with_canary(enhanced_seed())))
    note = "synth: off"
    if include_synth:
        try:
            from medfuse_core.data.synth import generate_corpus

            with tempfile.TemporaryDirectory() as tmp:
                generate_corpus(Path(tmp), n_studies=2, seed=5)
                paths = sorted(Path(tmp).rglob("*.dcm"))[:2]
                seeds += [(f"synth_{i}.dcm", _with_canary(p.read_bytes())) for i, p in enumerate(paths)]
            note = f"synth: {len(paths)} seeds"
        except Exception as exc:  # noqa: BLE001 - the synth module is not what is under test here
            note = f"synth: unavailable ({type(exc).__name__})"
    return seeds, note


# --------------------------------------------------------------------------- element walk


_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_ALL_VRS = _LONG_VRS | {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT",
    b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
}


@dataclass(frozen=True)
class Element:
    """Where one top-level element lies in the file."""

    tag: int
    start: int  # first byte of the tag
    len_off: int  # first byte of the length field
    len_size: int  # 2 or 4
    value_off: int
    length: int  # as stored (0xFFFFFFFF = undefined)
    end: int  # first byte after the element
    vr_off: int | None  # explicit VR only
    little: bool


def _meta_elements(raw: bytes) -> tuple[list[Element], int, str]:
    pos = 132 if raw[128:132] == b"DICM" else 0
    elems, tsyntax = [], ""
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 2:
            break
        vr = raw[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            len_off, size, value_off = pos + 8, 4, pos + 12
        else:
            len_off, size, value_off = pos + 6, 2, pos + 8
        length = int.from_bytes(raw[len_off : len_off + size], "little")
        end = value_off + length
        elems.append(Element((group << 16) | elem, pos, len_off, size, value_off, length, end, pos + 4, True))
        if elem == 0x0010:
            tsyntax = raw[value_off:end].rstrip(b"\x00 ").decode("ascii", "replace")
        pos = end
    return elems, pos, tsyntax


def elements(raw: bytes) -> tuple[list[Element], list[Element], str]:
    """(meta elements, top-level dataset elements, transfer syntax) of a valid file."""
    meta, start, tsyntax = _meta_elements(raw)
    if tsyntax == pydicom.uid.DeflatedExplicitVRLittleEndian:
        return meta, [], tsyntax  # the dataset bytes are compressed
    implicit = tsyntax == pydicom.uid.ImplicitVRLittleEndian
    little = tsyntax != pydicom.uid.ExplicitVRBigEndian
    fp = io.BytesIO(raw)
    fp.seek(start)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        items = list(data_element_generator(fp, implicit, little))
    order = "little" if little else "big"
    found = []
    for item in items:
        # raw elements carry value_tell; undefined-length sequences come back parsed, with file_tell
        tell = getattr(item, "value_tell", None)
        if tell is None:
            tell = item.file_tell
        if implicit:
            len_off, size, vr_off = tell - 4, 4, None
        elif str(item.VR).encode() in _LONG_VRS:
            len_off, size, vr_off = tell - 4, 4, tell - 8
        else:
            len_off, size, vr_off = tell - 2, 2, tell - 4
        first = (vr_off if vr_off is not None else len_off) - 4
        length = int.from_bytes(raw[len_off : len_off + size], order)  # type: ignore[arg-type]
        found.append((int(item.tag), first, len_off, size, tell, length, vr_off))
    # each element ends where the next one starts (undefined lengths included)
    ends = [f[1] for f in found[1:]] + [len(raw)]
    out = [Element(tag, first, lo, sz, tell, ln, end, vo, little)
           for (tag, first, lo, sz, tell, ln, vo), end in zip(found, ends)]
    return meta, out, tsyntax


# --------------------------------------------------------------------------- mutations


PIXEL_TAG = 0x7FE00010
_TS_CHOICES = (
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.201", "1.2.3.4.5.6", "",
)
_LENGTHS = (0, 1, 2, 3, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFE, 0xFFFFFFFF)
_SEMANTIC: tuple[tuple[str, object], ...] = (
    ("Rows", 0), ("Rows", 1), ("Rows", 65535), ("Columns", 0), ("Columns", 65535),
    ("BitsAllocated", 0), ("BitsAllocated", 1), ("BitsAllocated", 7), ("BitsAllocated", 12),
    ("BitsAllocated", 64), ("BitsAllocated", 65535), ("BitsStored", 0), ("BitsStored", 40),
    ("HighBit", 63), ("SamplesPerPixel", 0), ("SamplesPerPixel", 2), ("SamplesPerPixel", 4),
    ("PixelRepresentation", 2), ("PlanarConfiguration", 7),
    ("NumberOfFrames", "0"), ("NumberOfFrames", "-1"), ("NumberOfFrames", "2"), ("NumberOfFrames", "70000"),
    ("NumberOfFrames", "2147483647"), ("NumberOfFrames", "99999999999"), ("NumberOfFrames", "abc"),
    ("PhotometricInterpretation", "XYZ"), ("PhotometricInterpretation", "PALETTE COLOR"),
    ("PhotometricInterpretation", "MONOCHROME1"), ("PhotometricInterpretation", "YBR_FULL_422"),
    ("RescaleSlope", "nan"), ("RescaleSlope", "inf"), ("RescaleSlope", "0"), ("RescaleSlope", "-1e308"),
    ("RescaleIntercept", "x"), ("WindowWidth", "0"), ("WindowCenter", "nan"),
    ("SOPClassUID", "1.2.840.10008.5.1.4.1.1.88.11"),
    ("PixelData", None), ("Rows", None), ("BitsAllocated", None), ("PixelData", b""),
)


def _flip(raw: bytes, rng: random.Random, lo: int, hi: int, n: int) -> bytes:
    out = bytearray(raw)
    for _ in range(n):
        pos = rng.randrange(lo, max(lo + 1, hi))
        out[pos] ^= rng.randrange(1, 256)
    return bytes(out)


def _set_length(raw: bytes, e: Element, value: int) -> bytes:
    size = e.len_size
    value &= (1 << (8 * size)) - 1
    order = "little" if e.little else "big"
    return raw[: e.len_off] + value.to_bytes(size, order) + raw[e.len_off + size :]  # type: ignore[arg-type]


def _rebuild_meta(raw: bytes, meta: list[Element], tsyntax: str) -> bytes:
    """The file with its TransferSyntaxUID replaced and the group length recomputed."""
    body = b""
    for e in meta:
        if e.tag in (0x00020000,):
            continue
        if e.tag == 0x00020010:
            value = tsyntax.encode() + (b"\x00" if len(tsyntax) % 2 else b"")
            body += raw[e.start : e.start + 4] + b"UI" + struct.pack("<H", len(value)) + value
        else:
            body += raw[e.start : e.end]
    group = b"\x02\x00\x00\x00UL\x04\x00" + struct.pack("<I", len(body))
    end = meta[-1].end if meta else 132
    head = raw[:132] if raw[128:132] == b"DICM" else b""
    return head + group + body + raw[end:]


def _semantic(raw: bytes, keyword: str, value: object) -> bytes | None:
    """Re-encode with one element set to ``value`` (deleted when None); None if not encodable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(io.BytesIO(raw))
            if value is None:
                if keyword not in ds:
                    return None
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
            buf = io.BytesIO()
            ds.save_as(buf, enforce_file_format=False)
            return buf.getvalue()
        except Exception:  # noqa: BLE001 - pydicom refuses to write some values
            return None


def _variants_for(name: str, raw: bytes, rng: random.Random) -> Iterator[tuple[str, bytes]]:
    meta, elems, tsyntax = elements(raw)
    pixel = next((e for e in elems if e.tag == PIXEL_TAG), None)
    pix_lo = pixel.value_off if pixel else len(raw) // 2
    n = len(raw)

    # truncation: evenly spread, then random, then at element boundaries
    cuts = {int(n * k / 24) for k in range(1, 24)} | {rng.randrange(1, n) for _ in range(12)}
    cuts |= {e.start for e in elems[1::3]} | {n - 1, n - 2, pix_lo + 1, 131, 132}
    for cut in sorted(c for c in cuts if 0 < c < n):
        yield f"{name}:trunc@{cut}", raw[:cut]
    for i in range(20):
        yield f"{name}:flip-header#{i}", _flip(raw, rng, 128, pix_lo, rng.randrange(1, 5))
    for i in range(16):
        yield f"{name}:flip-pixels#{i}", _flip(raw, rng, pix_lo, n, rng.randrange(1, 9))
    yield f"{name}:zero-pixels", raw[:pix_lo] + bytes(n - pix_lo)
    # tag length and VR corruption
    targets = [e for e in elems if e.length != 0xFFFFFFFF]
    for i in range(14):
        e = rng.choice(targets) if targets else None
        if e is None:
            break
        value = rng.choice(_LENGTHS + (e.length + 1, e.length - 1, e.length * 2))
        yield f"{name}:len#{i}:{e.tag:08X}={value}", _set_length(raw, e, value)
    if pixel is not None:
        for value in (0, pixel.length // 2, pixel.length + 2, 0xFFFFFFFF):
            yield f"{name}:pixel-len={value}", _set_length(raw, pixel, value)
    explicit = [e for e in elems if e.vr_off is not None]
    for i in range(8):
        if not explicit:
            break
        e = rng.choice(explicit)
        vr = rng.choice(sorted(_ALL_VRS) + [b"XX", b"\x00\x00"])
        yield f"{name}:vr#{i}:{e.tag:08X}", raw[: e.vr_off] + vr + raw[e.vr_off + 2 :]  # type: ignore[operator]
    # duplicated elements: in place, and a copy appended after the pixel data
    for tag in (0x00280010, 0x00280100, 0x00100010, PIXEL_TAG, 0x00280008):
        e = next((x for x in elems if x.tag == tag), None)
        if e is not None:
            yield f"{name}:dup:{tag:08X}", raw[: e.end] + raw[e.start : e.end] + raw[e.end :]
            yield f"{name}:dup-end:{tag:08X}", raw + raw[e.start : e.end]
    # transfer syntax swapped in the file meta (the dataset bytes are left as they are)
    if meta:
        for uid in _TS_CHOICES:
            if uid != tsyntax:
                yield f"{name}:ts={uid or 'empty'}", _rebuild_meta(raw, meta, uid)
        yield f"{name}:no-meta", raw[meta[-1].end :]
    # well-formed files with absurd or missing header values
    for keyword, value in _SEMANTIC:
        out = _semantic(raw, keyword, value)
        if out is not None:
            yield f"{name}:set:{keyword}={value!r}", out


def make_variants(seeds: list[tuple[str, bytes]], seed: int = SEED) -> list[tuple[str, bytes]]:
    """Deterministic variants of every seed (one RNG per seed, derived from ``seed``)."""
    out: list[tuple[str, bytes]] = []
    for index, (name, raw) in enumerate(seeds):
        rng = random.Random(seed * 1000 + index)
        out.extend(_variants_for(name, raw, rng))
    return out


def digest(variants: list[tuple[str, bytes]]) -> str:
    h = hashlib.sha256()
    for name, data in variants:
        h.update(name.encode())
        h.update(hashlib.sha256(data).digest())
    return h.hexdigest()


# --------------------------------------------------------------------------- workers


def _leaks(exc: BaseException | None, texts: list[str]) -> bool:
    import traceback

    parts = list(texts)
    if exc is not None:
        parts += [str(exc), repr(exc), str(getattr(exc, "cause", "")), repr(exc.args)]
        parts.append("".join(traceback.format_exception(exc)))
    blob = "\n".join(parts)
    return CANARY in blob or CANARY_PATH in blob


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))


# Harness self-checks: a variant starting with this runs a deliberate failure in the worker.
CONTROL = b"\x00MEDFUSE-FUZZ-CONTROL:"


def _control(action: bytes, headroom_bytes: int) -> None:
    if action == b"alloc":
        bytearray(2 * headroom_bytes)  # beyond RLIMIT_AS: MemoryError
    elif action == b"sleep":
        time.sleep(3600)
    elif action == b"abort":
        os.abort()
    else:
        raise RuntimeError("unexpected exception")


def _worker_main(conn, workdir: str, headroom_bytes: int, max_decoded_bytes: int, max_file_bytes: int,
                 size: int) -> None:
    """Decode variants sent over ``conn`` until None arrives; reply (outcome, seconds, peak_rss_kb, leak)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import logging
    import resource

    import torch

    torch.set_num_threads(1)
    from medfuse_core.data.dicom import DicomDecodeError, decode_dicom, frame_indices, read_dataset

    records: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = _Keep(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    logging.getLogger("pydicom").setLevel(logging.DEBUG)

    limit = _status_kb("VmSize") * 1024 + headroom_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    path = os.path.join(workdir, f"{os.getpid()}-{CANARY_PATH}.dcm")
    try:  # reset the peak-RSS mark so that it measures decoding, not the imports (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass
    conn.send(("ready", _status_kb("VmRSS")))
    while True:
        task = conn.recv()
        if task is None:
            break
        index, data = task
        records.clear()
        exc: BaseException | None = None
        start = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                if data.startswith(CONTROL):
                    _control(data[len(CONTROL):], headroom_bytes)
                with open(path, "wb") as fh:
                    fh.write(data)
                ds = read_dataset(path, max_file_bytes)
                frames = frame_indices(ds, ("first", "middle", "all")[index % 3])
                for frame in frames[:4]:
                    decode_dicom(ds, size, apply_voi=bool(index % 2), frame=frame,
                                 max_decoded_bytes=max_decoded_bytes)
                outcome = "decoded"
            except DicomDecodeError as err:
                outcome, exc = f"reason:{err.reason}", err
            except MemoryError as err:
                outcome, exc = "memory", err
            except BaseException as err:  # noqa: BLE001 - anything else is a finding
                outcome, exc = f"crash:{type(err).__name__}", err
        seconds = time.perf_counter() - start
        leak = _leaks(exc, [str(w.message) for w in caught] + records)
        conn.send((index, outcome, seconds, _status_kb("VmHWM"), leak))


@dataclass
class FuzzReport:
    outcomes: dict[int, str] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    leaks: list[int] = field(default_factory=list)
    max_rss_kb: int = 0
    baseline_rss_kb: int = 0
    extra_outcomes: list[tuple[int, str]] = field(default_factory=list)  # a second outcome (must stay empty)
    wall_s: float = 0.0

    def counts(self) -> Counter:
        return Counter(self.outcomes.values())


class _Worker:
    def __init__(self, ctx, args: tuple):
        self._ctx, self._args = ctx, args
        self.baseline_kb = 0
        self._start()

    def _start(self) -> None:
        self.conn, child = self._ctx.Pipe()
        self.proc = self._ctx.Process(target=_worker_main, args=(child, *self._args), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(120):
            raise RuntimeError("fuzz worker did not start")
        _, self.baseline_kb = self.conn.recv()

    def restart(self) -> None:
        self.kill()
        self._start()

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(10)
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(10)
        self.kill()

    def death_outcome(self) -> str:
        self.proc.join(5)
        code = self.proc.exitcode
        if code == -signal.SIGKILL:
            return "memory"  # killed by the kernel (out of memory)
        return f"crash:exit{code}"


def run_variants(
    variants: list[tuple[str, bytes]],
    workers: int = 2,
    timeout_s: float = 20.0,
    headroom_bytes: int = 1 << 30,
    max_decoded_bytes: int = 32 << 20,
    max_file_bytes: int = 8 << 20,
    size: int = 32,
    progress: Callable[[int], None] | None = None,
) -> FuzzReport:
    """Decode every variant in ``workers`` spawned processes; one outcome per variant."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    report = FuzzReport()
    todo: queue.Queue[int] = queue.Queue()
    for i in range(len(variants)):
        todo.put(i)
    lock = threading.Lock()
    started = time.perf_counter()

    def record(index: int, outcome: str, seconds: float, rss_kb: int = 0, leak: bool = False) -> None:
        with lock:
            if index in report.outcomes:
                report.extra_outcomes.append((index, outcome))
                return
            report.outcomes[index] = outcome
            report.seconds[index] = seconds
            report.max_rss_kb = max(report.max_rss_kb, rss_kb)
            if leak:
                report.leaks.append(index)
            if progress is not None:
                progress(len(report.outcomes))

    def drive(worker: _Worker) -> None:
        with lock:
            report.baseline_rss_kb = max(report.baseline_rss_kb, worker.baseline_kb)
        while True:
            try:
                index = todo.get_nowait()
            except queue.Empty:
                worker.stop()
                return
            t0 = time.perf_counter()
            try:
                worker.conn.send((index, variants[index][1]))
                if not worker.conn.poll(timeout_s):
                    record(index, "timeout", time.perf_counter() - t0)
                    worker.restart()
                    continue
                got, outcome, seconds, rss_kb, leak = worker.conn.recv()
                record(got, outcome, seconds, rss_kb, leak)
            except (EOFError, OSError, BrokenPipeError):
                record(index, worker.death_outcome(), time.perf_counter() - t0)
                worker.restart()

    with tempfile.TemporaryDirectory(prefix="medfuse-fuzz-") as workdir:
        args = (workdir, headroom_bytes, max_decoded_bytes, max_file_bytes, size)
        pool = [_Worker(ctx, args) for _ in range(workers)]
        threads = [threading.Thread(target=drive, args=(w,), daemon=True) for w in pool]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    report.wall_s = time.perf_counter() - started
    return report


def summary(variants: list[tuple[str, bytes]], report: FuzzReport, note: str = "") -> str:
    counts = report.counts()
    reasons = {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("reason:")}
    bad = {k: v for k, v in counts.items() if k.split(":")[0] in ("crash", "timeout", "memory")}
    slowest = max(report.seconds.items(), key=lambda kv: kv[1], default=(None, 0.0))
    lines = [
        f"DICOM fuzz: {len(variants)} variants, digest {digest(variants)[:16]} ({note})",
        f"  decoded: {counts.get('decoded', 0)}",
        f"  quarantined: {sum(reasons.values())} by reason {reasons}",
        f"  crash/timeout/memory: {sum(bad.values())} {bad}",
        f"  canary leaks: {len(report.leaks)}",
        f"  max seconds per file: {slowest[1]:.3f}"
        + (f" ({variants[slowest[0]][0]})" if slowest[0] is not None else ""),
        f"  max RSS per worker while decoding: {report.max_rss_kb / 1024:.0f} MiB "
        f"(after imports incl. torch: {report.baseline_rss_kb / 1024:.0f} MiB; "
        f"growth {max(0, report.max_rss_kb - report.baseline_rss_kb) / 1024:.0f} MiB)",
        f"  wall: {report.wall_s:.1f} s",
    ]
    return "\n".join(lines)
