"""End-to-end ingest throughput: ``medfuse ingest`` on N cores against a plain pydicom loop on one.

One command::

    python benchmarks/ingest.py --out benchmarks/results/ingest.json

It writes (under ``--work``, reused when there) a manifest of ``--rows`` full-size DX files,
2048 x 1792, 12 bits stored in 16 (radiograph-like content from ``benchmarks/decode.py``;
MONOCHROME2, MONOCHROME1 and rescaled variants; each row its own file with its own UIDs and
patient), with a short report per row. Then, in this one command:

* ``plain``: the plain loop of ``benchmarks/decode.py`` (``dcmread``, ``pixel_array``,
  modality LUT, torch bilinear antialiased resize to ``--image-size``, min-max) over every
  file, one process, one thread: the baseline rate;
* ``medfuse N``: ``pipelines.ingest.run("manifest", ...)`` in a fresh process with a fresh
  local Ray cluster of N CPUs (timed after Ray has started), the whole job: listing, decode,
  de-identification, clinical context, Parquet shards and the summary.

It reports images/s and the ratio of each medfuse run to the plain loop's single-core rate,
with the machine's facts, as JSON (``--out``) and a Markdown table. It asserts nothing about
timings.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import decode as decode_bench  # noqa: E402  (the shared file generator, plain loop and machine facts)


def say(msg: str) -> None:
    print(f"[ingest-bench] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def make_manifest(work: Path, rows: int) -> Path:
    """``rows`` distinct full-size files and a manifest (reused when complete)."""
    manifest = work / "manifest.csv"
    if manifest.exists() and sum(1 for _ in manifest.open()) == rows + 1:
        return manifest
    import pandas as pd

    work.mkdir(parents=True, exist_ok=True)
    images = [decode_bench.radiograph(seed) for seed in range(min(rows, 20))]
    out = []
    for i in range(rows):
        img = images[i % len(images)]
        variant = ("mono2", "mono1", "rescale")[i % 3]
        if variant == "mono1":
            ds = decode_bench._dataset(4095 - img, "MONOCHROME1")
        elif variant == "rescale":
            ds = decode_bench._dataset(img, "MONOCHROME2", RescaleSlope="2.5", RescaleIntercept="-1024",
                                       RescaleType="US")
        else:
            ds = decode_bench._dataset(img, "MONOCHROME2")
        from pydicom.uid import generate_uid

        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"ingest-bench-{i}"])
        ds.PatientID = f"BENCH{i // 2:05d}"
        path = work / f"img_{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append({"study_id": f"S{i:06d}", "patient_id": ds.PatientID, "image_path": path.name,
                    "report": "INDICATION: Cough and fever.\n\nFINDINGS: No focal consolidation.\n\n"
                              "IMPRESSION: No acute process.\n", "Consolidation": "0.0"})
        if (i + 1) % 50 == 0:
            say(f"wrote {i + 1}/{rows} files")
    pd.DataFrame(out).to_csv(manifest, index=False)
    return manifest


def _child_plain(args) -> int:
    import pandas as pd

    decode, _ = decode_bench._decoder("plain")
    decode_bench.SIZE = args.image_size
    paths = [str(Path(args.manifest).parent / p) for p in pd.read_csv(args.manifest)["image_path"]]
    decode(paths[0])
    best = None
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for p in paths:
            decode(p)
        rate = len(paths) / (time.perf_counter() - t0)
        best = max(best or 0, rate)
    print(json.dumps({"images_per_s": best}))
    return 0


def _child_medfuse(args) -> int:
    import tempfile

    from medfuse_core.config import IngestConfig
    from pipelines import ingest
    from pipelines.runtime import init_ray

    init_ray(num_cpus=args.cpus)
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    rates, summary = [], None
    for _ in range(args.reps + 1):  # the first run also starts and warms Ray's worker processes
        with tempfile.TemporaryDirectory(dir=args.work) as tmp:
            t0 = time.perf_counter()
            summary = ingest.run("manifest", args.manifest, Path(tmp) / "data",
                                 IngestConfig(image_size=args.image_size, views=[]))
            rates.append(summary["n_ok"] / (time.perf_counter() - t0))
    print(json.dumps({"images_per_s": max(rates[1:]), "cold_images_per_s": rates[0], "warm_rates": rates[1:],
                      "n_ok": summary["n_ok"], "n_records": summary["n_records"]}))
    return 0


def _run_child(kind: str, args, **extra) -> dict:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.setdefault("MEDFUSE_DEID_KEY", "5" * 64)  # a benchmark key: the files hold no real patient
    env["MEDFUSE_PROGRESS"] = "0"
    if kind == "plain":
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = "1"
    cmd = [sys.executable, __file__, "--child", kind, "--manifest", str(args.manifest), "--work", str(args.work),
           "--image-size", str(args.image_size), "--reps", str(args.reps)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
    if proc.returncode:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"{kind} child failed")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--cores", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--work", type=Path, default=Path("/tmp/medfuse-bench/ingest"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ingest.json")
    p.add_argument("--child", choices=["plain", "medfuse"])
    p.add_argument("--manifest", type=Path)
    p.add_argument("--cpus", type=int, default=2)
    args = p.parse_args(argv)
    if args.child == "plain":
        return _child_plain(args)
    if args.child == "medfuse":
        return _child_medfuse(args)

    args.work.mkdir(parents=True, exist_ok=True)
    args.manifest = make_manifest(args.work, args.rows)
    facts = decode_bench.machine_facts()
    say(f"machine: {facts.get('cpu_cores')} cores, {facts.get('cpu_model')}; load {os.getloadavg()[0]:.1f}")
    plain = _run_child("plain", args)
    say(f"plain loop, 1 core: {plain['images_per_s']:.1f} images/s")
    rows = [{"run": "plain loop", "cores": 1, "images_per_s": plain["images_per_s"], "ratio": 1.0}]
    for n in args.cores:
        res = _run_child("medfuse", args, cpus=n)
        ratio = res["images_per_s"] / plain["images_per_s"]
        say(f"medfuse ingest, {n} core(s): {res['images_per_s']:.1f} images/s ({ratio:.2f}x the plain loop's 1-core rate)")
        rows.append({"run": "medfuse ingest", "cores": n, "images_per_s": res["images_per_s"], "ratio": ratio,
                     "cold_images_per_s": res["cold_images_per_s"], "warm_rates": res["warm_rates"],
                     "n_ok": res["n_ok"], "n_records": res["n_records"]})
    result = {"command": "python benchmarks/ingest.py " + " ".join(argv or sys.argv[1:]), "rows": args.rows,
              "image_size": args.image_size, "source": "2048x1792 12-bit DX, uncompressed", "reps": args.reps,
              "machine": facts, "load_avg_end": list(os.getloadavg()), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("\n| run | cores | images/s (best of %d warm runs) | x plain loop, 1 core | first run (cold workers) |"
          "\n|---|--:|--:|--:|--:|" % args.reps)
    for r in rows:
        cold = f"{r['cold_images_per_s']:.1f}" if "cold_images_per_s" in r else "-"
        print(f"| {r['run']} | {r['cores']} | {r['images_per_s']:.1f} | {r['ratio']:.2f}x | {cold} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
