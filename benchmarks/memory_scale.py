"""Memory at scale: peak driver RSS, peak object-store use and bytes spilled for ingest and evaluate.

One command::

    python benchmarks/memory_scale.py --sizes 1000 4000 --image-size 512 \\
        --out benchmarks/results/memory_scale.json

For each size (frontal images, i.e. images that ingest keeps as ok) it generates a synthetic
corpus once (cached under ``--work``; a rerun skips generation), then runs ingest and then
evaluate, each in a fresh Python subprocess that starts its own local Ray cluster
(``pipelines.runtime.init_ray(num_cpus=2)``). Inside that subprocess a sampler thread reads

* the driver's resident set size from ``/proc/self/status`` (VmRSS) every 0.2 s, plus
  ``ru_maxrss`` at the end;
* the cluster's object-store statistics every 0.5 s from the raylet's
  ``FormatGlobalMemoryInfo`` reply (``ray._private.internal_api.get_memory_info_reply``, the
  call behind ``ray memory --stats-only``), addressed to this cluster's own GCS: bytes in use
  (peak), capacity, bytes created in total, and bytes spilled / restored.

Results (and the machine's facts) go to ``--out`` as JSON and a Markdown table is printed.
The script measures; it asserts nothing about timings or sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
_TAG = "[memory_scale]"


def say(msg: str) -> None:
    print(f"{_TAG} {time.strftime('%H:%M:%S')} {msg}", flush=True)


# ============================================================================ child side


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler(threading.Thread):
    """Polls this process's RSS (every ``rss_every`` s) and, once Ray is up, the object store."""

    def __init__(self, rss_every: float = 0.2, store_every: float = 0.5):
        super().__init__(daemon=True)
        self.rss_every, self.store_every = rss_every, store_every
        self.stop_event = threading.Event()
        self.peak_rss = _rss_bytes()
        self.store = {"peak_used": 0, "peak_primary": 0, "capacity": 0, "spilled_bytes": 0, "spilled_objects": 0,
                      "restored_bytes": 0, "created_bytes": 0, "fallback_peak": 0, "samples": 0, "errors": 0}
        self._state = None
        self._last_store = 0.0

    def _poll_store(self) -> None:
        import ray
        from ray._private import internal_api

        if not ray.is_initialized():
            return
        if self._state is None:  # this cluster's GCS, never "the latest cluster on this machine"
            self._state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
        s = internal_api.get_memory_info_reply(self._state, timeout_seconds=10).store_stats
        st = self.store
        st["peak_used"] = max(st["peak_used"], s.object_store_bytes_used)
        st["peak_primary"] = max(st["peak_primary"], s.object_store_bytes_primary_copy)
        st["fallback_peak"] = max(st["fallback_peak"], s.object_store_bytes_fallback)
        st["capacity"] = max(st["capacity"], s.object_store_bytes_avail)
        st["spilled_bytes"] = max(st["spilled_bytes"], s.spilled_bytes_total)
        st["spilled_objects"] = max(st["spilled_objects"], s.spilled_objects_total)
        st["restored_bytes"] = max(st["restored_bytes"], s.restored_bytes_total)
        st["created_bytes"] = max(st["created_bytes"], s.cumulative_created_bytes)
        st["samples"] += 1

    def sample(self) -> None:
        self.peak_rss = max(self.peak_rss, _rss_bytes())
        now = time.monotonic()
        if now - self._last_store >= self.store_every:
            self._last_store = now
            try:
                self._poll_store()
            except Exception:  # a sample lost while Ray starts or stops
                self.store["errors"] += 1

    def run(self) -> None:
        while not self.stop_event.wait(self.rss_every):
            self.sample()

    def finish(self) -> dict:
        self.stop_event.set()
        self.join()
        self._last_store = 0.0
        self.sample()  # a last store sample before the cluster goes
        return {"peak_rss_bytes": self.peak_rss,
                "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "object_store": dict(self.store)}


def child(args) -> int:
    """One stage (ingest or evaluate) in this fresh process, with its own local Ray."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    sampler = Sampler()
    sampler.start()
    t0 = time.time()
    from pipelines.runtime import init_ray

    init_ray(num_cpus=2)
    import ray

    result: dict = {"stage": args.stage}
    if args.stage == "ingest":
        from medfuse_core.config import IngestConfig
        from pipelines import ingest

        summary = ingest.run("mimic-cxr", args.corpus, args.data, IngestConfig(image_size=args.image_size))
        result.update({k: summary[k] for k in ("n_records", "n_ok", "n_quarantined", "n_filtered", "n_images",
                                              "splits")})
    else:
        import inspect

        from pipelines import evaluate

        kwargs = {"log_images": False} if "log_images" in inspect.signature(evaluate.run).parameters else {}
        metrics = evaluate.run(args.bundle, args.data, args.metrics, **kwargs)
        result.update({"n_test": metrics.get("n_test"), "evaluate_signature": str(inspect.signature(evaluate.run)),
                       "image_text_auroc_macro": metrics.get("image_text", {}).get("auroc_macro")})
    result["seconds"] = round(time.time() - t0, 1)
    result.update(sampler.finish())
    result["object_store_memory_config"] = int(ray.cluster_resources().get("object_store_memory", 0))
    ray.shutdown()
    Path(args.result).write_text(json.dumps(result, indent=2))
    return 0


# ============================================================================ parent side


def machine_facts() -> dict:
    import numpy
    import pyarrow
    import ray
    import torch

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {"cpu_cores": os.cpu_count(), "cpu_model": model, "ram_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "ray": ray.__version__, "torch": torch.__version__,
            "pyarrow": pyarrow.__version__, "numpy": numpy.__version__}


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def evaluate_version() -> dict:
    """Which pipelines/evaluate.py is measured: last commit touching it, and uncommitted changes."""
    import hashlib

    src = REPO / "pipelines" / "evaluate.py"
    return {"commit": _git("log", "-1", "--format=%h", "--", "pipelines/evaluate.py"),
            "diff_stat": _git("diff", "--stat", "--", "pipelines/evaluate.py"),
            "sha1": hashlib.sha1(src.read_bytes()).hexdigest()[:12]}


def studies_for(n_images: int, seed: int) -> int:
    """How many studies give ``n_images`` frontal (PA/AP) images with this seed (from the corpus plan)."""
    try:
        from medfuse_core.data.synth import _plan_corpus  # cheap: plans, renders nothing
    except ImportError:
        return n_images

    def frontal(n: int) -> int:
        return sum(im.view in ("PA", "AP") for st in _plan_corpus(n, seed) for im in st.images)

    n = n_images
    for _ in range(8):
        got = frontal(n)
        if got == n_images:
            break
        n = max(1, round(n * n_images / max(got, 1)))
    return n


def corpus_for(work: Path, n_images: int, seed: int) -> tuple[Path, dict]:
    from medfuse_core.data.synth import generate_corpus

    n_studies = studies_for(n_images, seed)
    root = work / f"corpus-{n_studies}-seed{seed}"
    done = root / ".memory_scale_complete.json"
    if done.is_file():
        say(f"corpus {root.name}: cached")
        return root, json.loads(done.read_text())
    shutil.rmtree(root, ignore_errors=True)
    say(f"corpus {root.name}: generating {n_studies} studies")
    t0 = time.time()
    last = [0.0]

    def progress(i: int, total: int) -> None:
        if time.time() - last[0] > 30 or i == total:
            last[0] = time.time()
            say(f"  synth {i}/{total} studies")

    stats = generate_corpus(root, n_studies=n_studies, seed=seed, progress=progress)
    stats["seconds"] = round(time.time() - t0, 1)
    done.write_text(json.dumps(stats))
    return root, stats


def bundle_for(work: Path, image_size: int) -> Path:
    """A tiny untrained model bundle (ResNet-18, MiniLM text, fusion dim 32) at ``image_size``."""
    out = work / f"bundle-{image_size}"
    if (out / "medfuse_model.json").is_file():
        return out
    import torch

    from medfuse_core.config import FusionConfig, HeadConfig, ModelConfig, TextConfig, VisionConfig
    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.models import build_model, save_bundle

    torch.manual_seed(0)
    cfg = ModelConfig(vision=VisionConfig(name="resnet18", in_channels=1),
                      text=TextConfig(name_or_path="minilm", trainable_layers=0, max_tokens=16),
                      fusion=FusionConfig(name="co_attention", dim=32, heads=2, layers=1, dropout=0.1),
                      head=HeadConfig(hidden=16, dropout=0.1))
    labels = list(CHEXPERT_LABELS)
    model = build_model(cfg, len(labels), image_size).eval()
    shutil.rmtree(out, ignore_errors=True)
    save_bundle(model, cfg, labels, image_size, out)
    return out


def run_stage(stage: str, work: Path, tag: str, **paths) -> dict:
    """Run one stage in a fresh subprocess; print a heartbeat every 30 s; return its result."""
    import psutil

    result = work / f"{tag}-{stage}.result.json"
    log_path = work / f"{tag}-{stage}.log"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--result", str(result)]
    for k, v in paths.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always a fresh local cluster
    env.update(MEDFUSE_PROGRESS="0", PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    say(f"{tag} {stage}: started (log {log_path})")
    t0 = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        ps = psutil.Process(proc.pid)
        while True:
            try:
                rc = proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                try:
                    rss = ps.memory_info().rss / MiB
                except psutil.Error:
                    rss = float("nan")
                say(f"{tag} {stage}: running {time.time() - t0:.0f} s, driver RSS now {rss:.0f} MiB, "
                    f"load {os.getloadavg()[0]:.1f}")
    if rc != 0 or not result.is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{tag} {stage} failed (exit {rc}); end of {log_path}:\n{tail}")
    out = json.loads(result.read_text())
    out["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    st = out["object_store"]
    say(f"{tag} {stage}: done in {out['seconds']} s; driver peak RSS {out['peak_rss_bytes'] / MiB:.0f} MiB, "
        f"object store peak {st['peak_used'] / MiB:.0f} MiB of {st['capacity'] / MiB:.0f}, "
        f"spilled {st['spilled_bytes'] / MiB:.0f} MiB")
    return out


def markdown(results: dict) -> str:
    rows = ["| images (ok) | decoded volume | stage | wall (s) | driver peak RSS | driver ru_maxrss "
            "| object store peak | store capacity | created in store | spilled |",
            "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run in results["runs"]:
        for stage in ("ingest", "evaluate"):
            r = run.get(stage)
            if not r:
                continue
            st = r["object_store"]
            rows.append(
                f"| {run['n_images_ok']} | {run['decoded_bytes'] / MiB:,.0f} MiB | {stage} | {r['seconds']:.0f} "
                f"| {r['peak_rss_bytes'] / MiB:,.0f} MiB | {r['ru_maxrss_bytes'] / MiB:,.0f} MiB "
                f"| {st['peak_used'] / MiB:,.0f} MiB ({st['peak_used'] / run['decoded_bytes']:.0%}) "
                f"| {st['capacity'] / MiB:,.0f} MiB | {st['created_bytes'] / MiB:,.0f} MiB "
                f"| {st['spilled_bytes'] / MiB:,.0f} MiB |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000], help="frontal images per corpus")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/memory_scale.json")
    p.add_argument("--work", default=os.environ.get("MEDFUSE_BENCH_WORK", "/tmp/medfuse-bench"),
                   help="cache for corpora and the model bundle; ingest outputs are rewritten each run")
    p.add_argument("--stages", nargs="+", choices=["ingest", "evaluate"], default=["ingest", "evaluate"])
    # child mode (internal)
    p.add_argument("--child", choices=["ingest", "evaluate"], help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--bundle", help=argparse.SUPPRESS)
    p.add_argument("--metrics", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.stage = args.child
        return child(args)

    sys.path.insert(0, str(REPO))
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = {"command": "python benchmarks/memory_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_facts(),
               "image_size": args.image_size, "seed": args.seed,
               "object_store_api": "ray._private.internal_api.get_memory_info_reply(...).store_stats "
                                   "(raylet FormatGlobalMemoryInfo; as `ray memory --stats-only`)",
               "load_avg_start": list(os.getloadavg()), "runs": []}
    say(f"machine: {results['machine']['cpu_cores']} cores, {results['machine']['cpu_model']}, "
        f"{results['machine']['ram_bytes'] / 2**30:.1f} GiB; load {os.getloadavg()[0]:.1f}")
    bundle = bundle_for(work, args.image_size) if "evaluate" in args.stages else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for n in args.sizes:
        corpus, stats = corpus_for(work, n, args.seed)
        tag = f"n{n}-px{args.image_size}"
        data = work / f"data-{tag}"
        run: dict = {"n_images_target": n, "corpus": {k: stats.get(k) for k in ("n_studies", "n_images", "n_lateral",
                                                                                 "bytes", "seconds")}}
        if "ingest" in args.stages or not (data / "ingest_summary.json").is_file():
            shutil.rmtree(data, ignore_errors=True)
            run["ingest"] = run_stage("ingest", work, tag, corpus=corpus, data=data, image_size=args.image_size)
        summary = json.loads((data / "ingest_summary.json").read_text())
        run["n_images_ok"] = summary["n_images"]
        run["decoded_bytes"] = summary["n_images"] * args.image_size ** 2 * 2  # float16 pixels
        run["splits"] = summary["splits"]
        if "evaluate" in args.stages:
            version = evaluate_version()
            run["evaluate"] = run_stage("evaluate", work, tag, bundle=bundle, data=data,
                                        metrics=work / f"{tag}-metrics.json")
            run["evaluate"]["evaluate_version"] = version
        results["runs"].append(run)
        out.write_text(json.dumps(results, indent=2))  # partial results survive a later failure
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results["load_avg_end"] = list(os.getloadavg())
    out.write_text(json.dumps(results, indent=2))
    say(f"wrote {out}")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
