"""Decoding throughput per core: ``medfuse_core.data.dicom.decode_dicom`` vs a plain pydicom loop vs MONAI.

One command::

    python benchmarks/decode.py --out benchmarks/results/decode.json

It writes its own test files (under ``--work``; reused when already there): 2048 x 1792
12-bit DX radiographs stored in 16 bits allocated, with radiograph-like content (smooth
gradients, body and lung fields, ribs, spine, heart, a lead marker, low-frequency and
quantum noise), in these variants:

* ``mono2``   MONOCHROME2, no rescale (4 files)
* ``mono1``   MONOCHROME1 (stored values inverted) (4 files)
* ``rescale`` MONOCHROME2 with RescaleSlope 2.5 / RescaleIntercept -1024 (4 files)
* ``rle``     RLE Lossless copies of one of each and one more MONOCHROME2 (4 files)

Each decoder runs in a fresh Python subprocess with one thread (OMP/OPENBLAS/MKL thread
variables set to 1 before any import, ``torch.set_num_threads(1)``, ``cv2.setNumThreads(1)``):

* ``medfuse``: ``decode_dicom(path, 256)`` (aspect-preserving resize + letterbox, robust [0, 1]);
* ``plain``:   ``dcmread``, ``pixel_array``, ``apply_modality_lut``, torch bilinear antialiased
  resize to 256 x 256, min-max;
* ``monai``:   ``LoadImage(image_only=True, ensure_channel_first=True)`` (the reader MONAI picks
  for ``.dcm``), ``Resize((256, 256))``, ``ScaleIntensity()``.

Pixels first: every decoder's output is compared with medfuse's by Pearson correlation
after matching geometry (the 256 x 256 stretched outputs are resized to medfuse's
aspect-preserving content box, MONAI's transposed axes are swapped back, and the plain and
MONAI outputs of MONOCHROME1 files, which they do not invert, are negated); each must be
>= 0.999. ``--save-reference FILE`` stores medfuse's outputs and ``--reference FILE`` compares
against such a file (e.g. one saved with an earlier version of the decoder).

Then timing: each repetition decodes every file of a set ``--passes`` times (files come from
the page cache after the first read); images/s per core is reported as best-of-N and median
over ``--reps`` repetitions of wall-clock time, with the ratios medfuse/plain and
medfuse/MONAI, and also per CPU-second of the process (``time.process_time``), which a
machine shared with other jobs inflates less than wall-clock time. Results and the machine's
facts (cores, CPU model, load average at start and end, library versions) go to ``--out`` as
JSON, and a Markdown table is printed. The script asserts nothing about timings; it exits
non-zero only when pixels disagree.

Before/after figures for a change to the decoder: ``--libs medfuse --medfuse-module OLD.py``
times another copy of ``medfuse_core/data/dicom.py`` (e.g. ``git show REV:medfuse_core/data/dicom.py``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ROWS, COLS, SIZE = 2048, 1792, 256
MIN_CORR = 0.999
LIBS = ("medfuse", "plain", "monai")
SETS = ("native", "rle")
_GEN_VERSION = 1  # bump when the generated content changes
_TAG = "[decode]"


def say(msg: str) -> None:
    print(f"{_TAG} {time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


# ============================================================================ test files


def _soft(r: np.ndarray, width: float) -> np.ndarray:
    """1 inside (r < 1), 0 outside, with a smooth edge of about ``width``."""
    return 0.5 * (1.0 - np.tanh((r - 1.0) / width))


def radiograph(seed: int, rows: int = ROWS, cols: int = COLS) -> np.ndarray:
    """A chest-radiograph-like 12-bit image (display values, higher = brighter), uint16."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    y = (y / rows) * 2 - 1  # -1..1, top to bottom
    x = (x / cols) * 2 - 1
    jit = lambda s: float(rng.uniform(-s, s))  # noqa: E731
    img = 250 + 120 * (y + 1) + 40 * x  # air, heel effect
    body = _soft(np.hypot((x - jit(0.03)) / (0.82 + jit(0.03)), (y - 0.25) / 1.25), 0.04)
    img += body * (1500 + 200 * (y + 1))  # soft tissue, thicker lower down
    lungs = np.zeros_like(x)
    for side in (-1, 1):
        cx, cy = side * (0.36 + jit(0.02)), -0.12 + jit(0.03)
        lungs += _soft(np.hypot((x - cx) / (0.26 + jit(0.02)), (y - cy) / (0.62 + jit(0.03))), 0.08)
    lungs = np.clip(lungs, 0, 1) * body
    img -= lungs * 850  # aerated lung is darker
    ribs = np.maximum(0, np.sin(18 * (y + 0.35 * x * x) + jit(3.0))) ** 6
    img += ribs * lungs * 380 + ribs * (1 - lungs) * body * 120
    spine = _soft(np.abs(x - jit(0.01)) / 0.085, 0.15) * body
    vertebrae = 0.75 + 0.25 * np.sin(40 * y + jit(3.0)) ** 2
    img += spine * vertebrae * 900
    heart = _soft(np.hypot((x + 0.1) / 0.3, (y - 0.22) / 0.3), 0.1) * body
    img += heart * 500
    clav = np.exp(-(((y + 0.58 + 0.25 * x * x) / 0.025) ** 2)) * (np.abs(x) < 0.55) * body
    img += clav * 450
    # low-frequency mottle: a coarse random field, bilinearly upsampled
    coarse = rng.normal(0.0, 1.0, (17, 15)).astype(np.float32)
    gy, gx = np.linspace(0, 16, rows, dtype=np.float32), np.linspace(0, 14, cols, dtype=np.float32)
    iy, ix = np.minimum(gy.astype(int), 15), np.minimum(gx.astype(int), 13)
    fy, fx = (gy - iy)[:, None], (gx - ix)[None, :]
    mottle = ((1 - fy) * ((1 - fx) * coarse[iy][:, ix] + fx * coarse[iy][:, ix + 1])
              + fy * ((1 - fx) * coarse[iy + 1][:, ix] + fx * coarse[iy + 1][:, ix + 1]))
    img += mottle * 60 * body
    img += rng.normal(0.0, 22.0, img.shape).astype(np.float32)  # quantum noise
    r0, c0 = int(rows * 0.06), int(cols * 0.08)  # lead marker, near saturation
    img[r0 : r0 + 90, c0 : c0 + 22] = 3950
    img[r0 : r0 + 22, c0 : c0 + 70] = 3950
    return np.clip(np.rint(img), 0, 4095).astype(np.uint16)


def _dataset(stored: np.ndarray, photometric: str, **extra):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[photometric, str(extra), str(stored[::97, ::89].sum())])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.ViewPosition = "PA"
    ds.PatientName = "BENCH^DECODE"
    ds.PatientID = "BENCH"
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


def make_files(work: Path) -> dict[str, list[dict]]:
    """Write the benchmark files (once) and return {set: [{name, path, variant}, ...]}."""
    from pydicom.uid import RLELossless

    manifest = work / "manifest.json"
    if manifest.exists():
        data = json.loads(manifest.read_text())
        if data.get("version") == _GEN_VERSION and all(Path(f["path"]).exists() for s in data["sets"].values() for f in s):
            return data["sets"]
    work.mkdir(parents=True, exist_ok=True)
    sets: dict[str, list[dict]] = {"native": [], "rle": []}
    rle_plan = {("mono2", 0), ("mono2", 1), ("mono1", 2), ("rescale", 3)}
    for seed in range(4):
        img = radiograph(seed)
        variants = {
            "mono2": _dataset(img, "MONOCHROME2"),
            "mono1": _dataset(4095 - img, "MONOCHROME1"),
            "rescale": _dataset(img, "MONOCHROME2", RescaleSlope="2.5", RescaleIntercept="-1024",
                                RescaleType="US"),
        }
        for variant, ds in variants.items():
            path = work / f"{variant}_{seed}.dcm"
            ds.save_as(path, enforce_file_format=True)
            sets["native"].append({"name": path.stem, "path": str(path), "variant": variant})
            if (variant, seed) in rle_plan:
                ds.compress(RLELossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
                path = work / f"rle_{variant}_{seed}.dcm"
                ds.save_as(path, enforce_file_format=True)
                sets["rle"].append({"name": path.stem, "path": str(path), "variant": variant})
        say(f"wrote the files of seed {seed}")
    manifest.write_text(json.dumps({"version": _GEN_VERSION, "sets": sets}, indent=1))
    return sets


# ============================================================================ child side


def _decoder(lib: str, module: str | None = None):
    """(decode(path) -> float32 2-D array, facts about the decoder)."""
    import torch

    torch.set_num_threads(1)
    try:
        import cv2

        cv2.setNumThreads(1)
    except ImportError:
        pass
    if lib == "medfuse":
        sys.path.insert(0, str(REPO))
        if module:  # another copy of medfuse_core/data/dicom.py (e.g. an earlier version), for before/after
            import importlib.util

            spec = importlib.util.spec_from_file_location("medfuse_dicom_under_test", module)
            mod = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = mod
            spec.loader.exec_module(mod)
            decode_dicom = mod.decode_dicom
        else:
            from medfuse_core.data.dicom import decode_dicom

        return (lambda path: decode_dicom(path, SIZE).pixels), {"module": module or "medfuse_core.data.dicom"}
    if lib == "plain":
        import pydicom
        import torch.nn.functional as F
        from pydicom.pixels import apply_modality_lut

        def plain(path):
            ds = pydicom.dcmread(path)
            arr = apply_modality_lut(ds.pixel_array, ds)
            t = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
            x = F.interpolate(t, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)[0, 0]
            x = x.numpy()
            lo, hi = x.min(), x.max()
            return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)

        return plain, {}
    if lib == "monai":
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from monai.transforms import LoadImage, Resize, ScaleIntensity

            load = LoadImage(image_only=True, ensure_channel_first=True)
        resize, scale = Resize((SIZE, SIZE)), ScaleIntensity()
        probe = next((r for r in load.readers[::-1] if r.verify_suffix("x.dcm")), None)

        def monai_decode(path):
            return np.asarray(scale(resize(load(path)))[0], dtype=np.float32)

        return monai_decode, {"reader": type(probe).__name__ if probe else None,
                              "resize_mode": getattr(resize, "mode", None)}
    raise ValueError(lib)


def child(args) -> int:
    files = json.loads(Path(args.files).read_text())
    decode, facts = _decoder(args.child, args.medfuse_module)
    outputs = {f["name"]: decode(f["path"]) for s in files.values() for f in s}  # warm-up + pixels
    np.savez(args.outputs, **outputs)
    timings: dict[str, list[float]] = {}
    for set_name, set_files in files.items():
        paths = [f["path"] for f in set_files]
        rates, cpu_rates = [], []
        for _ in range(args.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(args.passes):
                for path in paths:
                    decode(path)
            n = len(paths) * args.passes
            rates.append(n / (time.perf_counter() - t0))
            cpu_rates.append(n / max(time.process_time() - c0, 1e-9))
        timings[set_name] = {"wall": rates, "cpu": cpu_rates}
    import torch

    facts.update(torch_threads=torch.get_num_threads(), omp=os.environ.get("OMP_NUM_THREADS"))
    try:
        import cv2

        facts["cv2_threads"] = cv2.getNumThreads()
    except ImportError:
        pass
    Path(args.result).write_text(json.dumps({"lib": args.child, "rates": timings, "facts": facts}))
    return 0


# ============================================================================ parent side


def _content_box(size: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the image inside medfuse's letterboxed output."""
    scale = size / max(rows, cols)
    h = min(size, max(1, int(round(rows * scale))))
    w = min(size, max(1, int(round(cols * scale))))
    return (size - h) // 2, (size - w) // 2, h, w


def _fit(x: np.ndarray, h: int, w: int) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    if x.shape == (h, w):
        return x
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None, None]
    return F.interpolate(t, size=(h, w), mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(np.corrcoef(a, b)[0, 1])


def check_pixels(files: dict, outputs: dict[str, dict], reference: dict | None) -> dict:
    """Correlations of each decoder's output with medfuse's, geometry matched."""
    top, left, h, w = _content_box(SIZE, ROWS, COLS)
    report: dict = {}
    for s in files.values():
        for f in s:
            name, variant = f["name"], f["variant"]
            ours = outputs["medfuse"][name]
            content = ours[top : top + h, left : left + w]
            row: dict = {"variant": variant}
            outside = np.delete(ours, np.s_[left : left + w], axis=1)
            row["letterbox_zero"] = bool(np.all(outside == 0)) and ours.shape == (SIZE, SIZE)
            for lib in ("plain", "monai"):
                if lib not in outputs:
                    continue
                other = outputs[lib][name]
                sign = -1.0 if variant == "mono1" else 1.0  # neither inverts MONOCHROME1
                straight = _corr(content, sign * _fit(other, h, w))
                swapped = _corr(content, sign * _fit(other.T, h, w))
                row[lib] = max(straight, swapped)
                if swapped > straight:
                    row[f"{lib}_transposed"] = True
            if reference is not None and name in reference:
                row["reference"] = _corr(ours, reference[name])
                row["reference_max_abs"] = float(np.abs(ours - reference[name]).max())
            report[name] = row
    return report


def run_child(lib: str, files_json: Path, work: Path, reps: int, passes: int,
              module: str | None = None) -> tuple[dict, dict]:
    result, outs = work / f"result_{lib}.json", work / f"outputs_{lib}.npz"
    env = dict(os.environ)
    env.update({v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                 "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", lib, "--files", str(files_json),
           "--result", str(result), "--outputs", str(outs), "--reps", str(reps), "--passes", str(passes)]
    if module:
        cmd += ["--medfuse-module", module]
    subprocess.run(cmd, check=True, env=env, cwd=str(REPO))
    with np.load(outs) as z:
        outputs = {k: z[k] for k in z.files}
    return json.loads(result.read_text()), outputs


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def machine_facts() -> dict:
    model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "medfuse_core/data/dicom.py"], cwd=REPO,
                                    capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {
        "cpu_cores": os.cpu_count(), "cpu_model": model, "ram_bytes": mem, "platform": platform.platform(),
        "python": platform.python_version(), "load_average_start": list(os.getloadavg()),
        "medfuse_commit": commit, "dicom_py_uncommitted_changes": dirty,
        "versions": {d: _version(d) for d in ("numpy", "pydicom", "torch", "opencv-python-headless", "monai",
                                              "pylibjpeg", "pylibjpeg-rle", "pillow")},
    }


def markdown(results: dict) -> str:
    n = results["reps"]
    lines = [f"| files | decoder | images/s, best of {n} | median | medfuse ÷ this, best | median "
             "| images/s per CPU-second, best | medfuse ÷ this |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for set_name, per_lib in results["timing"].items():
        ours = per_lib.get("medfuse")
        for lib, t in per_lib.items():
            ratio_b = ratio_m = ratio_c = "—"
            if ours and lib != "medfuse":
                ratio_b = f"{ours['best'] / t['best']:.2f}x"
                ratio_m = f"{ours['median'] / t['median']:.2f}x"
                ratio_c = f"{ours['cpu_best'] / t['cpu_best']:.2f}x"
            label = f"{set_name} ({t['files']})"
            lines.append(f"| {label} | {lib} | {t['best']:.1f} | {t['median']:.1f} | {ratio_b} | {ratio_m} "
                         f"| {t['cpu_best']:.1f} | {ratio_c} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks/results/decode.json"))
    p.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "medfuse-bench-decode"),
                   help="where the test files are written (reused when present)")
    p.add_argument("--libs", nargs="+", default=list(LIBS), choices=LIBS)
    p.add_argument("--reps", type=int, default=7, help="timed repetitions per set")
    p.add_argument("--passes", type=int, default=3, help="passes over the set per repetition")
    p.add_argument("--save-reference", help="store medfuse's outputs (npz) for a later --reference")
    p.add_argument("--reference", help="compare medfuse's outputs with this npz (correlation >= 0.999)")
    p.add_argument("--medfuse-module", help="time this copy of medfuse_core/data/dicom.py instead of the installed "
                   "one (e.g. one written by 'git show REV:medfuse_core/data/dicom.py'), for before/after figures")
    p.add_argument("--child", choices=LIBS, help=argparse.SUPPRESS)
    p.add_argument("--files", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--outputs", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    work = Path(args.work)
    facts = machine_facts()
    say(f"machine: {facts['cpu_cores']} cores, {facts['cpu_model']}, load {facts['load_average_start']}")
    files = make_files(work)
    files_json = work / "files.json"
    files_json.write_text(json.dumps(files))
    libs = ["medfuse"] + [lib for lib in args.libs if lib != "medfuse"]
    if args.medfuse_module:
        args.medfuse_module = str(Path(args.medfuse_module).resolve())
    results: dict = {"machine": facts, "medfuse_module": args.medfuse_module, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                     "size": SIZE, "image": f"{ROWS}x{COLS} 12-bit in 16 allocated", "reps": args.reps,
                     "passes": args.passes, "timing": {s: {} for s in files}, "decoders": {}}
    outputs = {}
    for lib in libs:
        say(f"{lib}: decoding and timing in a fresh one-thread process")
        res, outputs[lib] = run_child(lib, files_json, work, args.reps, args.passes,
                                     args.medfuse_module if lib == "medfuse" else None)
        results["decoders"][lib] = res["facts"]
        for set_name, rates in res["rates"].items():
            results["timing"][set_name][lib] = {
                "files": len(files[set_name]), "best": max(rates["wall"]), "median": float(np.median(rates["wall"])),
                "cpu_best": max(rates["cpu"]), "cpu_median": float(np.median(rates["cpu"])),
                "wall_all": rates["wall"], "cpu_all": rates["cpu"],
            }
    if args.save_reference:
        Path(args.save_reference).parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.save_reference, **outputs["medfuse"])
        say(f"medfuse outputs saved to {args.save_reference}")
    reference = None
    if args.reference:
        with np.load(args.reference) as z:
            reference = {k: z[k] for k in z.files}
    pixels = check_pixels(files, outputs, reference)
    failures = []
    for name, row in pixels.items():
        for key in ("plain", "monai", "reference"):
            if key in row and not row[key] >= MIN_CORR:
                failures.append(f"{name}: {key} correlation {row[key]:.5f} < {MIN_CORR}")
        if not row["letterbox_zero"]:
            failures.append(f"{name}: letterbox padding is not zero")
    results["pixels"] = {"min_correlation": MIN_CORR, "per_file": pixels, "failures": failures}
    results["machine"]["load_average_end"] = list(os.getloadavg())
    for set_name, per_lib in results["timing"].items():
        ours = per_lib.get("medfuse")
        for lib, t in per_lib.items():
            if lib != "medfuse" and ours:
                t["medfuse_ratio_best"] = ours["best"] / t["best"]
                t["medfuse_ratio_median"] = ours["median"] / t["median"]
                t["medfuse_ratio_cpu_best"] = ours["cpu_best"] / t["cpu_best"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(markdown(results))
    worst = {key: min(row[key] for row in pixels.values() if key in row) for key in ("plain", "monai", "reference")
             if any(key in row for row in pixels.values())}
    print("\nlowest correlation with medfuse: " + ", ".join(f"{k} {v:.5f}" for k, v in worst.items()))
    if failures:
        for msg in failures:
            say("PIXELS DISAGREE: " + msg)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
