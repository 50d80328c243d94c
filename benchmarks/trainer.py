"""Trainer overhead: `medfuse finetune` against a plain single-process PyTorch loop.

One command::

    python benchmarks/trainer.py --out benchmarks/results/trainer.json

It builds (or reuses, under ``--work``) a synthetic corpus
(``medfuse_core.data.synth.generate_corpus(dir, n_studies=--studies, seed=0)``) and its shards
(``pipelines.ingest.run("mimic-cxr", corpus, data, IngestConfig(image_size=--image-size))``),
then runs, each in a fresh Python process (its own local Ray cluster where it uses Ray):

* ``plain``: one process, ``torch.set_num_threads(--threads)``, the train split's labelled
  images read from the same Parquet shards into one in-memory tensor first, then the same
  ``build_model(cfg.model, ...)`` image-only ResNet-18 model (``model.text.name_or_path=none``,
  ``model.fusion.name=image_only``), AdamW over ``model.param_groups``, the same LR schedule,
  gradient clipping, batch size and steps per epoch as the trainer: the compute baseline;
* ``medfuse``: ``pipelines.finetune.run(cfg, data, workdir)`` with the same model, images and
  batch size, on 1 or 2 workers and ZeRO 0, 2 or 3. Training throughput is the epoch's
  ``perf/epoch_samples_per_sec`` (training steps only; validation, checkpointing and model
  logging are not counted), with ``perf/data_wait_fraction`` (waiting on Ray Data) and
  ``perf/batch_prep_fraction`` (blob decode, augmentation), read back from MLflow with
  ``MlflowClient``. Per-rank memory (parameters, gradients, optimizer state) comes from the
  train state the loop writes after its first step (``memory``), rank 0's also from
  ``perf/mem/*`` in MLflow.

The first epoch of every run is reported apart (it pays the pipeline's and the allocator's
warm-up); "steady" figures are over the later epochs. Plain and 1-worker runs are interleaved
``--repeats`` times so that a shared machine's load hits both alike; the ratio is computed per
repeat (medfuse / plain of the same repeat) and reported as median and best.
Results and the machine's facts go to ``--out`` as JSON and a Markdown table is printed.
The script measures; it asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_EXPERIMENT = REPO / "experiments" / "finetune_cxr_cpu.yaml"
MiB = 2**20
_TAG = "[trainer-bench]"


def say(msg: str) -> None:
    print(f"{_TAG} {time.strftime('%H:%M:%S')} {msg}", flush=True)


def overrides(args, **extra) -> list[str]:
    """The image-only experiment both sides train (the CPU experiment with text switched off)."""
    base = {
        "model.text.name_or_path": "none",
        "model.fusion.name": "image_only",
        "model.vision.name": "resnet18",
        "data.image_size": args.image_size,
        "data.augment": str(not args.no_augment).lower(),
        "train.batch_size": args.batch_size,
        "train.epochs": args.epochs,
        "train.log_every_steps": 5,
        "train.warmup_steps": 5,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


# ============================================================================ children


def _load_avg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def child_prepare(spec: dict) -> dict:
    from medfuse_core.config import IngestConfig
    from medfuse_core.data.synth import generate_corpus
    from pipelines import ingest
    from pipelines.runtime import init_ray

    corpus, data = Path(spec["corpus"]), Path(spec["data"])
    if not (corpus / ".done").is_file():
        if corpus.exists():
            shutil.rmtree(corpus)
        corpus.mkdir(parents=True)
        generate_corpus(corpus, n_studies=spec["studies"], seed=0)
        (corpus / ".done").write_text("ok\n")
    if data.exists():
        shutil.rmtree(data)
    init_ray(num_cpus=os.cpu_count())
    summary = ingest.run("mimic-cxr", corpus, data, IngestConfig(image_size=spec["image_size"]))
    return {"labelled_images_per_split": summary.get("labelled_images_per_split")}


def child_plain(spec: dict) -> dict:
    """The compute baseline: every image in memory, then forward/backward/step, nothing else."""
    import numpy as np
    import torch

    from medfuse_core.data.batching import blobs_to_images, images_to_tensor, label_indices
    from medfuse_core.experiment import load_config
    from medfuse_core.data.labels import training_targets
    from medfuse_core.objectives.diagnosis import masked_bce_with_logits
    from medfuse_core.models import build_model
    from pipelines.shards import read_split_table
    from pipelines.train_loop import lr_lambda

    torch.set_num_threads(spec["threads"])
    cfg = load_config(CPU_EXPERIMENT, spec["overrides"])
    t_load = time.perf_counter()
    table = read_split_table(spec["data"], "train", ["image", "image_size", "labels", "labelled"])
    rows = table.to_pydict()
    keep = [i for i, flag in enumerate(rows["labelled"]) if flag]
    images = images_to_tensor(blobs_to_images([rows["image"][i] for i in keep], [rows["image_size"][i] for i in keep]),
                              cfg.data.image_size)
    raw = np.stack([np.asarray(rows["labels"][i], dtype=np.float32) for i in keep])[:, label_indices(cfg.data.labels)]
    targets, weights = (torch.from_numpy(a) for a in training_targets(raw, cfg.data.uncertain_policy,
                                                                     cfg.data.blank_policy))
    if spec.get("channels_last"):
        images = images.contiguous(memory_format=torch.channels_last)
    load_seconds = time.perf_counter() - t_load

    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, num_labels=len(cfg.data.labels), image_size=cfg.data.image_size).train()
    if spec.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.param_groups(cfg.train.lr, cfg.train.text_lr, cfg.train.weight_decay),
                            lr=cfg.train.lr)
    bs, n = cfg.train.batch_size, len(images)
    steps = max(1, n // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train.warmup_steps, steps * cfg.train.epochs))
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(cfg.train.seed)
    epochs = []
    for _ in range(cfg.train.epochs):
        perm = torch.randperm(n, generator=gen)
        losses = []
        t0 = time.perf_counter()
        for s in range(steps):
            idx = perm[s * bs:(s + 1) * bs]
            logits = model(images[idx])["logits"]
            loss = masked_bce_with_logits(logits, targets[idx], weights[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            opt.step()
            sched.step()
            losses.append(loss.detach())
        dt = time.perf_counter() - t0
        epochs.append({"samples_per_sec": steps * bs / dt, "seconds": dt,
                       "loss": float(torch.stack(losses).mean())})
    return {"n_train": n, "steps_per_epoch": steps, "load_seconds": load_seconds, "epochs": epochs,
            "threads": torch.get_num_threads()}


def plain_step(model, opt, x, y, w, grad_clip: float):
    """A plain torch training step of a diagnosis model on one batch (masked BCE, backward, clip, step)."""
    import torch

    from medfuse_core.objectives.diagnosis import masked_bce_with_logits

    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        loss = masked_bce_with_logits(model(x)["logits"], y, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        return loss
    return step


def _timed_rounds(variants: dict, rounds: int, per_round: int) -> dict:
    """Median and best seconds per call of each variant, the variants interleaved round by round."""
    for fn in variants.values():  # warm-up (allocator, oneDNN primitive caches)
        fn()
        fn()
    times: dict = {k: [] for k in variants}
    for _ in range(rounds):
        for k, fn in variants.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            times[k].append((time.perf_counter() - t0) / per_round)
    return {k: {"median_s": statistics.median(v), "best_s": min(v), "rounds": v} for k, v in times.items()}


def child_micro(spec: dict) -> dict:
    """In-process A/B of single remedies, interleaved so a shared machine's load hits all alike.

    * batch prep: the per-row blob decode (one ``np.frombuffer`` + ``astype`` per image, then
      ``np.stack`` and a separate normalisation) against ``blobs_to_tensor`` (one join, one
      pass), with and without augmentation, on 16-row batches read from the shards;
    * a training step of the image-only model at ``batch_size``: plain torch (zero_grad,
      backward, clip, AdamW step) contiguous and channels-last; DeepSpeed ZeRO-0 on one rank
      (gloo) as DeepSpeed runs it, without its one-rank gradient all-reduce, and with that
      plus channels-last conv weights; DeepSpeed ZeRO-2 on one rank;
    * the cost of reading the loss each step (``loss.item()``).
    """
    import numpy as np
    import torch

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec.get("port", 29561)), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from medfuse_core.data.batching import IMAGE_MEAN, IMAGE_STD, blobs_to_tensor, make_batch
    from medfuse_core.experiment import load_config
    from medfuse_core.objectives.diagnosis import masked_bce_with_logits
    from medfuse_core.models import build_model
    from pipelines.shards import read_split_table
    from pipelines.train_loop import conv_weights_channels_last, deepspeed_config

    torch.set_num_threads(spec["threads"])
    cfg = load_config(CPU_EXPERIMENT, spec["overrides"] + ["deepspeed.zero_stage=0"])
    bs, size = cfg.train.batch_size, cfg.data.image_size
    out: dict = {"threads": spec["threads"], "batch_size": bs, "image_size": size}

    t = read_split_table(spec["data"], "train", ["image", "image_size", "labels", "labelled"], limit=bs).to_pydict()
    rows = {"image": np.array(t["image"][:bs], dtype=object), "image_size": np.array(t["image_size"][:bs]),
            "labels": [np.asarray(v, np.float32) for v in t["labels"][:bs]],
            "labelled": np.array(t["labelled"][:bs])}

    def per_row():  # the decode as it was: one frombuffer/astype per row, np.stack, then normalise
        imgs = [np.frombuffer(b, dtype=np.float16).reshape(int(s), int(s)).astype(np.float32)
                for b, s in zip(rows["image"], rows["image_size"])]
        x = torch.as_tensor(np.stack([np.asarray(i, dtype=np.float32) for i in imgs]))[:, None]
        return (x - IMAGE_MEAN) / IMAGE_STD

    gen = torch.Generator().manual_seed(0)
    labels = cfg.data.labels
    out["batch_prep"] = _timed_rounds({
        "decode per row": per_row,
        "decode vectorised (blobs_to_tensor)": lambda: blobs_to_tensor(rows["image"], rows["image_size"], size),
        "make_batch, augment": lambda: make_batch(rows, None, labels=labels, image_size=size, max_tokens=8,
                                                  train=True, augment_images=True, generator=gen),
        "make_batch, no augment": lambda: make_batch(rows, None, labels=labels, image_size=size, max_tokens=8,
                                                     train=True, augment_images=False, generator=gen),
    }, rounds=10, per_round=20)

    deepspeed.init_distributed(dist_backend="gloo")
    x = torch.randn(bs, 1, size, size, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(bs, len(labels), generator=torch.Generator().manual_seed(2)) > 0.7).float()
    w = torch.ones_like(y)

    def fresh():
        torch.manual_seed(0)
        m = build_model(cfg.model, num_labels=len(labels), image_size=size).train()
        return m, torch.optim.AdamW(m.param_groups(cfg.train.lr, cfg.train.text_lr, cfg.train.weight_decay),
                                    lr=cfg.train.lr)

    def plain(channels_last: bool):
        m, opt = fresh()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        return plain_step(m, opt, x, y, w, cfg.train.grad_clip)

    def ds(allreduce: bool, channels_last: bool, stage: int = 0):
        m, opt = fresh()
        engine, *_ = deepspeed.initialize(model=m, optimizer=opt, config=deepspeed_config(cfg, False, stage))
        engine.enable_backward_allreduce = allreduce
        if channels_last:
            conv_weights_channels_last(engine.module)

        def step():
            loss = masked_bce_with_logits(engine(x)["logits"], y, w)
            engine.backward(loss)
            engine.step()
            return loss
        return step

    steps = {
        "plain torch, contiguous": plain(False),
        "plain torch, channels-last": plain(True),
        "DeepSpeed ZeRO-0, 1 rank, as shipped by DeepSpeed": ds(True, False),
        "DeepSpeed ZeRO-0, 1 rank, no all-reduce": ds(False, False),
        "DeepSpeed ZeRO-0, 1 rank, no all-reduce, channels-last": ds(False, True),
        "DeepSpeed ZeRO-2, 1 rank (what a 1-worker ZeRO-2 run used to be)": ds(True, False, 2),
    }
    out["step"] = _timed_rounds(steps, rounds=spec.get("rounds", 8), per_round=2)
    loss = steps["plain torch, contiguous"]()
    out["loss_item"] = _timed_rounds({"loss.item() after a step": lambda: loss.item()}, rounds=5, per_round=200)
    return out


def child_threads(spec: dict) -> dict:
    """Median seconds of a plain training step with ``torch.set_num_threads(spec['threads'])``."""
    import torch

    from medfuse_core.experiment import load_config
    from medfuse_core.objectives.diagnosis import masked_bce_with_logits
    from medfuse_core.models import build_model

    torch.set_num_threads(spec["threads"])
    cfg = load_config(CPU_EXPERIMENT, spec["overrides"])
    bs, size, n = cfg.train.batch_size, cfg.data.image_size, len(cfg.data.labels)
    torch.manual_seed(0)
    m = build_model(cfg.model, num_labels=n, image_size=size).train()
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.train.lr)
    x, y = torch.randn(bs, 1, size, size), (torch.rand(bs, n) > 0.7).float()

    def step():
        loss = masked_bce_with_logits(m(x)["logits"], y, torch.ones_like(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _timed_rounds({f"{spec['threads']} threads": step}, rounds=6, per_round=2)


def child_finetune(spec: dict) -> dict:
    import mlflow

    from medfuse_core.experiment import load_config
    from pipelines import finetune
    from pipelines.runtime import init_ray

    cfg = load_config(CPU_EXPERIMENT, spec["overrides"])
    workdir = Path(spec["workdir"])
    if workdir.exists():
        shutil.rmtree(workdir)
    init_ray(num_cpus=os.cpu_count())
    t0 = time.perf_counter()
    facts = finetune.run(cfg, spec["data"], workdir)
    wall = time.perf_counter() - t0
    client = mlflow.MlflowClient(facts["tracking_uri"])
    run_id = facts["mlflow_run_id"]

    def history(key):
        return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]

    per_epoch = {k: history(f"perf/{k}") for k in ("epoch_samples_per_sec", "data_wait_fraction",
                                                    "batch_prep_fraction", "epoch_train_seconds",
                                                    "first_batch_wait_seconds")}
    epochs = [{"samples_per_sec": per_epoch["epoch_samples_per_sec"][i],
               "data_wait_fraction": per_epoch["data_wait_fraction"][i],
               "batch_prep_fraction": per_epoch["batch_prep_fraction"][i],
               "seconds": per_epoch["epoch_train_seconds"][i],
               "first_batch_wait_seconds": (per_epoch["first_batch_wait_seconds"] or [None] * (i + 1))[i]}
              for i in range(len(per_epoch["epoch_samples_per_sec"]))]
    mem_rank0 = {k: (history(f"perf/mem/{k}") or [None])[-1]
                 for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "master_params_bytes", "bucket_bytes")}
    states = [s for s, _ in finetune.find_checkpoints(workdir / "ray")]
    memory = max(states, key=lambda s: s["global_step"]).get("memory") if states else None
    out = {"epochs": epochs, "wall_seconds": wall, "mlflow_mem_rank0": mem_rank0, "memory": memory,
           "val_auroc_macro": facts.get("best_val_auroc_macro")}
    if not spec.get("keep"):
        shutil.rmtree(workdir, ignore_errors=True)
    return out


CHILDREN = {"prepare": child_prepare, "plain": child_plain, "finetune": child_finetune, "micro": child_micro,
            "threads": child_threads}


def child_main(kind: str, spec_path: str) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(Path(spec_path).read_text())
    load_before = _load_avg()
    result = CHILDREN[kind](spec)
    result["load_avg_before"], result["load_avg_after"] = load_before, _load_avg()
    Path(spec["result"]).write_text(json.dumps(result, indent=2))
    return 0


# ============================================================================ driver


def run_child(kind: str, spec: dict, work: Path, name: str, timeout: float) -> dict:
    spec = dict(spec)
    spec_path, result_path, log_path = (work / "specs" / f"{name}.json", work / "specs" / f"{name}.result.json",
                                        work / "logs" / f"{name}.log")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    result_path.unlink(missing_ok=True)
    spec["result"] = str(result_path)
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, MEDFUSE_PROGRESS="0", PYTHONPATH=str(REPO))
    env.pop("MLFLOW_TRACKING_URI", None)  # every finetune keeps its own store in its workdir
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    with open(log_path, "w") as log:
        # its own session, so that a run past the timeout (e.g. a starved Ray Data read) takes the
        # local Ray cluster it started down with it
        proc = subprocess.Popen([sys.executable, __file__, "--child", kind, spec_path.as_posix()], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
    if rc != 0 or not result_path.is_file():
        say(f"{name}: failed ({rc}); log: {log_path}")
        return {"error": str(rc), "log": str(log_path), "seconds": time.time() - t0}
    out = json.loads(result_path.read_text())
    out["process_seconds"] = time.time() - t0
    return out


def steady(epochs: list[dict], key: str = "samples_per_sec") -> float | None:
    later = [e[key] for e in epochs[1:]] or [e[key] for e in epochs]
    return statistics.mean(later) if later else None


def machine_facts() -> dict:
    import deepspeed  # noqa: F401  (version only)
    import numpy
    import pyarrow
    import ray
    import torch

    def first(path, prefix):
        try:
            for line in Path(path).read_text().splitlines():
                if line.startswith(prefix):
                    return line.split(":", 1)[1].strip()
        except OSError:
            return ""
        return ""

    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"cpu_cores": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "cpu_model": first("/proc/cpuinfo", "model name"), "ram": first("/proc/meminfo", "MemTotal"),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "torch_default_threads": torch.get_num_threads(), "ray": ray.__version__,
            "deepspeed": sys.modules["deepspeed"].__version__, "pyarrow": pyarrow.__version__,
            "numpy": numpy.__version__, "git_commit": git("rev-parse", "HEAD"),
            "git_dirty_files": git("status", "--porcelain").splitlines(), "load_avg_start": _load_avg()}


def fmt(v, spec=".1f"):
    return "–" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    lines = ["| case | workers | ZeRO | torch threads | CPUs reserved / worker | samples/s steady: median (best) "
             "| first epoch | vs plain: median (best) | data wait | batch prep |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for case in results["cases"]:
        s = case["summary"]
        lines.append(
            f"| {case['name']} | {case.get('workers', '–')} | {case.get('zero', '–')} | {case.get('threads', '–')} | "
            f"{case.get('cpus_per_worker', '–')} | {fmt(s.get('median'))} ({fmt(s.get('best'))}) | "
            f"{fmt(s.get('first_epoch'))} | "
            f"{fmt(s.get('ratio_median'), '.2f')}x ({fmt(s.get('ratio_best'), '.2f')}x) | "
            f"{fmt(s.get('data_wait') and 100 * s['data_wait'])}% | "
            f"{fmt(s.get('batch_prep') and 100 * s['batch_prep'])}% |".replace("–x", "–").replace("–%", "–"))
    micro = results.get("micro") or {}
    for section, title in (("batch_prep", "batch prep (16 rows)"), ("step", "training step"),
                           ("loss_item", "per-step sync")):
        if section in micro:
            lines += ["", f"| {title} | median ms | best ms |", "|---|---:|---:|"]
            lines += [f"| {k} | {1e3 * v['median_s']:.2f} | {1e3 * v['best_s']:.2f} |"
                      for k, v in micro[section].items()]
    if results.get("threads"):
        lines += ["", "| plain step, torch threads | median ms | best ms |", "|---|---:|---:|"]
        for r in results["threads"]:
            for k, v in r.items():
                if isinstance(v, dict) and "median_s" in v:
                    lines.append(f"| {k} | {1e3 * v['median_s']:.0f} | {1e3 * v['best_s']:.0f} |")
    mem = [c for c in results["cases"] if c.get("memory")]
    if mem:
        lines += ["", "| ZeRO (configured -> run) | workers | rank | params MiB | grads MiB | optimizer state MiB "
                  "| fp32 master MiB "
                  "| total MiB | reduce buckets MiB (allocated) |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for case in sorted(mem, key=lambda c: (c["workers"], c["zero"])):
            for r in case["memory"]["ranks"]:
                total = r["params_bytes"] + r["grads_bytes"] + r["optimizer_bytes"] + r["master_params_bytes"]
                run_stage = case["memory"].get("zero_stage", case["zero"])
                stage = f"{case['zero']}" if run_stage == case["zero"] else f"{case['zero']} -> {run_stage}"
                lines.append(f"| {stage} | {case['workers']} | {r['rank']} | {r['params_bytes'] / MiB:.1f} | "
                             f"{r['grads_bytes'] / MiB:.1f} | {r['optimizer_bytes'] / MiB:.1f} | "
                             f"{r['master_params_bytes'] / MiB:.1f} | {total / MiB:.1f} | "
                             f"{r['bucket_bytes'] / MiB:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "trainer.json"))
    p.add_argument("--work", default=os.environ.get("MEDFUSE_BENCH_WORK", "/tmp/medfuse-bench"))
    p.add_argument("--studies", type=int, default=600)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="interleaved plain / 1-worker rounds")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the plain loop (and the 1-worker case)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs each 1-worker trainer reserves")
    p.add_argument("--no-augment", action="store_true", help="train without augmentation (default: the experiment's)")
    p.add_argument("--cases", default="micro,threads,plain,plain-cl,z0,z2,w2,mem",
                   help="comma list of: micro (in-process A/B of single remedies), threads (plain step, 1 vs 2 "
                        "torch threads), plain, plain-cl (plain loop, channels-last), plain2 (plain loop, 2 "
                        "threads), z0, z2 (1 worker), w2 (2 workers, ZeRO-2), mem (2 workers, ZeRO 0 and 3, one "
                        "epoch each; ZeRO-2 comes from w2)")
    p.add_argument("--extra", default="", help="space-separated key=value overrides for every medfuse run")
    p.add_argument("--label", default="", help="a note stored with the results (e.g. the code state measured)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child_main(*args.child)

    work = Path(args.work)
    corpus = work / f"corpus-{args.studies}"
    data = work / f"data-{args.studies}-{args.image_size}"
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    results = {"machine": machine_facts(), "label": args.label,
               "settings": {k: v for k, v in vars(args).items() if k != "child"}, "cases": []}
    if not (data / "ingest_summary.json").is_file():
        say(f"preparing corpus ({args.studies} studies) and {args.image_size}-px shards under {work}")
        prep = run_child("prepare", {"corpus": str(corpus), "data": str(data), "studies": args.studies,
                                     "image_size": args.image_size}, work, "prepare", args.timeout)
        if "error" in prep:
            return 1
    summary = json.loads((data / "ingest_summary.json").read_text())
    results["data"] = {"dir": str(data), "labelled_images_per_split": summary.get("labelled_images_per_split"),
                       "image_size": summary.get("image_size")}
    extra = [e for e in args.extra.split() if e]

    def medfuse_spec(name, workers, zero, cpus, epochs=None):
        ov = overrides(args, **{"scaling.num_workers": workers, "scaling.cpus_per_worker": cpus,
                                "deepspeed.zero_stage": zero, "train.epochs": epochs or args.epochs}) + extra
        return {"overrides": ov, "data": str(data), "workdir": str(work / "runs" / name)}

    plan = []  # (case name, kind, spec, meta)
    for rep in range(args.repeats):
        if "plain" in cases:
            plan.append(("plain", "plain", {"overrides": overrides(args), "data": str(data), "threads": args.threads},
                         {"threads": args.threads}))
        if "plain-cl" in cases:
            plan.append(("plain, channels-last", "plain", {"overrides": overrides(args), "data": str(data),
                                                            "threads": args.threads, "channels_last": True},
                         {"threads": args.threads}))
        if "plain2" in cases:
            plan.append(("plain (2 threads)", "plain", {"overrides": overrides(args), "data": str(data), "threads": 2},
                         {"threads": 2}))
        for zero in (0, 2):
            if f"z{zero}" in cases:
                plan.append((f"medfuse 1 worker ZeRO-{zero}", "finetune",
                             medfuse_spec(f"w1-z{zero}", 1, zero, args.cpus_per_worker),
                             {"workers": 1, "zero": zero, "cpus_per_worker": args.cpus_per_worker,
                              "threads": math.ceil(args.cpus_per_worker)}))
    if "w2" in cases:
        plan.append(("medfuse 2 workers ZeRO-2", "finetune", medfuse_spec("w2-z2", 2, 2, 0.5),
                     {"workers": 2, "zero": 2, "cpus_per_worker": 0.5, "threads": 1}))
    if "mem" in cases:
        for zero in (0, 3):
            plan.append((f"medfuse 2 workers ZeRO-{zero} (memory, 1 epoch)", "finetune",
                         medfuse_spec(f"w2-z{zero}", 2, zero, 0.5, epochs=1),
                         {"workers": 2, "zero": zero, "cpus_per_worker": 0.5, "threads": 1}))

    if "micro" in cases:
        say("micro: batch prep, step variants, loss.item() (one process)")
        results["micro"] = run_child("micro", {"overrides": overrides(args), "data": str(data),
                                               "threads": args.threads}, work, "micro", args.timeout)
    if "threads" in cases:
        results["threads"] = []
        for rep in range(2):
            for t in (1, 2):
                say(f"threads: plain step with {t} torch threads (round {rep + 1})")
                results["threads"].append(run_child("threads", {"overrides": overrides(args), "threads": t}, work,
                                                    f"threads-{t}-{rep}", args.timeout))

    runs: dict[str, list] = {}
    metas: dict[str, dict] = {}
    for i, (name, kind, spec, meta) in enumerate(plan):
        say(f"[{i + 1}/{len(plan)}] {name}")
        tag = f"{i:02d}-" + "".join(ch if ch.isalnum() else "-" for ch in name)
        out = run_child(kind, spec, work, tag, args.timeout)
        if "epochs" in out:
            say(f"    epochs samples/s: {[round(e['samples_per_sec'], 2) for e in out['epochs']]}; "
                f"load avg {out.get('load_avg_before')} -> {out.get('load_avg_after')}")
        runs.setdefault(name, []).append(out)
        metas[name] = meta

    plain_steady = [steady(r["epochs"]) for r in runs.get("plain", []) if "epochs" in r]
    for name, outs in runs.items():
        ok = [o for o in outs if "epochs" in o]
        st = [steady(o["epochs"]) for o in ok]
        s = {}
        if st:
            s = {"median": statistics.median(st), "best": max(st), "per_repeat": st,
                 "first_epoch": statistics.median(o["epochs"][0]["samples_per_sec"] for o in ok)}
            if "data_wait_fraction" in ok[0]["epochs"][0]:
                s["data_wait"] = statistics.median(steady(o["epochs"], "data_wait_fraction") for o in ok)
                s["batch_prep"] = statistics.median(steady(o["epochs"], "batch_prep_fraction") for o in ok)
            if plain_steady and name != "plain" and len(st) == len(plain_steady) and metas[name].get("workers") == 1:
                ratios = [a / b for a, b in zip(st, plain_steady)]
                s.update(ratio_median=statistics.median(ratios), ratio_best=max(ratios), ratios=ratios)
            elif plain_steady and name != "plain":
                s.update(ratio_median=s["median"] / statistics.median(plain_steady),
                         ratio_best=s["best"] / max(plain_steady))
        memory = next((o["memory"] for o in ok if o.get("memory")), None)
        results["cases"].append({"name": name, **metas[name], "summary": s, "memory": memory, "runs": outs})
    results["machine"]["load_avg_end"] = _load_avg()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    table = markdown(results)
    print(table)
    say(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
