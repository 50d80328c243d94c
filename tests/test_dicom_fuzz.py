"""Seeded mutation fuzzing of DICOM decoding: every variant ends decoded or with a reason code,
within bounded time and memory, and no header value or path reaches an error or warning."""

from __future__ import annotations

import logging
import signal
import warnings

import pytest

from tests import dicom_fuzz_harness as harness
from medfuse_core.data.dicom import REASON_CODES, DicomDecodeError, decode_dicom, read_dataset

MIN_VARIANTS = 2000
TIMEOUT_S = 20.0  # per file; far above the observed maximum (well under a second)
HEADROOM = 1 << 30  # address space a worker may add to what its imports took (RLIMIT_AS)


@pytest.fixture(scope="module")
def seeds():
    return harness.seed_files()


@pytest.fixture(scope="module")
def variants(seeds):
    return harness.make_variants(seeds[0])


def test_variants_are_seeded_and_repeatable(seeds, variants):
    again = harness.make_variants(harness.seed_files(include_synth=False)[0])
    ours = [v for v in variants if not v[0].startswith("synth_")]
    assert harness.digest(again) == harness.digest(ours)
    assert len(variants) >= MIN_VARIANTS
    assert len({name for name, _ in variants}) == len(variants)
    kinds = {name.split(":")[1].split("#")[0].split("@")[0].split("=")[0] for name, _ in variants}
    for kind in ("trunc", "flip-header", "flip-pixels", "len", "pixel-len", "vr", "dup", "ts", "set"):
        assert kind in kinds


def test_every_variant_decodes_or_fails_typed_within_bounds(seeds, variants, capsys):
    report = harness.run_variants(variants, workers=2, timeout_s=TIMEOUT_S, headroom_bytes=HEADROOM)
    with capsys.disabled():
        print("\n" + harness.summary(variants, report, seeds[1]))

    assert sorted(report.outcomes) == list(range(len(variants)))  # exactly one outcome each
    assert report.extra_outcomes == []
    bad = {harness_name: outcome for index, outcome in report.outcomes.items()
           if outcome.split(":")[0] in ("crash", "timeout", "memory")
           for harness_name in [variants[index][0]]}
    assert bad == {}
    for outcome in report.outcomes.values():
        assert outcome == "decoded" or outcome.split(":", 1)[1] in REASON_CODES
    assert report.leaks == [], [variants[i][0] for i in report.leaks[:10]]
    assert max(report.seconds.values()) < TIMEOUT_S
    counts = report.counts()
    assert counts["decoded"] > 300  # mutations that leave the image readable still decode
    assert counts["reason:truncated"] > 300 and counts["reason:too_large"] > 0


def test_harness_detects_memory_timeout_and_crash():
    """Positive controls: each failure kind the fuzz test asserts absent is really recorded."""
    controls = [(f"control:{a}", harness.CONTROL + a.encode()) for a in ("alloc", "sleep", "abort", "raise")]
    report = harness.run_variants(controls, workers=2, timeout_s=3.0, headroom_bytes=256 << 20)
    assert report.outcomes == {0: "memory", 1: "timeout", 2: f"crash:exit{-signal.SIGABRT}", 3: "crash:RuntimeError"}


def test_leak_detector_sees_a_canary():
    assert harness._leaks(ValueError(f"bad value {harness.CANARY}"), [])
    assert harness._leaks(None, [f"/data/{harness.CANARY_PATH}.dcm"])
    assert not harness._leaks(DicomDecodeError("truncated", "EOFError"), ["a warning"])


def test_canary_never_in_errors_warnings_or_logs_in_process(variants, tmp_path, caplog):
    """The same property checked in this process, with pytest's own warning/log capture."""
    picked = [v for v in variants if v[0].startswith(("CT_small.dcm", "MR_small_RLE.dcm"))][::7][:60]
    caplog.set_level(logging.DEBUG)
    logging.getLogger("pydicom").setLevel(logging.DEBUG)
    failures = 0
    try:
        for name, data in picked:
            path = tmp_path / f"{harness.CANARY_PATH}.dcm"
            path.write_bytes(data)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    decode_dicom(path, 32)
                except DicomDecodeError as exc:
                    failures += 1
                    assert not harness._leaks(exc, []), name
                    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
            assert not harness._leaks(None, [str(w.message) for w in caught]), name
        assert not harness._leaks(None, [r.getMessage() for r in caplog.records])
    finally:
        logging.getLogger("pydicom").setLevel(logging.WARNING)
    assert 0 < failures < len(picked)


def test_too_large_file_is_refused_before_reading(tmp_path):
    data = harness.seed_files(include_synth=False)[0][0][1]
    path = tmp_path / "big.dcm"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(DicomDecodeError) as info:
            read_dataset(source, max_file_bytes=len(data) - 1)
        assert info.value.reason == "too_large"
    assert read_dataset(path, max_file_bytes=len(data)).Rows == 128
