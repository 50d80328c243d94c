"""The per-worker training loop (runs inside Ray Train workers, one DeepSpeed engine each).

Reads top to bottom: open the first epoch's data stream -> build model -> DeepSpeed engine ->
restore -> for each epoch: train steps (per-step metrics to MLflow from rank 0; the next epoch's
stream opens when they end), validation, checkpoint through ``ray.train.report``.
"""

from __future__ import annotations

import json
import math
import os
import queue
import tempfile
import threading
import time
from contextlib import contextmanager

import numpy as np
import torch

from pipelines.checkpoints import BUNDLE_DIR, TRAIN_STATE, check_complete, write_rank_manifest
from pipelines.weight_average import applied, maybe_average

DS_TAG = "deepspeed"


# Ray Data's own read-ahead in iter_batches; 4 measured no better (the wait was start-up + buffer fill)
PREFETCH_BATCHES = 1


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, epoch, ...) without collisions between the parts."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the optimizer trains (what a checkpoint must hold)."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def _deepspeed_checkpoint_globals() -> list:
    """The few DeepSpeed classes its checkpoints pickle besides tensors (allow-listed, nothing else)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loading():
    """Force ``torch.load(weights_only=True)`` (DeepSpeed asks for False) with DeepSpeed's classes allowed."""
    import torch.serialization

    previous = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_checkpoint_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = previous


def effective_zero_stage(cfg, world: int) -> int:
    """The ZeRO stage a run of ``world`` ranks uses: the configured one, except that a single rank
    without optimizer offload runs stage 0.

    With one data-parallel rank every ZeRO partition is the whole model, so stages 1-3 save
    nothing, yet they keep an extra fp32 master copy and pay flat-buffer copies and one-rank
    collectives each step (ZeRO-2, one worker, ResNet-18 on CPU: about 20% slower than stage 0
    and 25% more memory). Offload (memory moved to the CPU) is kept as configured.
    """
    if world == 1 and not cfg.deepspeed.offload_optimizer:
        return 0
    return cfg.deepspeed.zero_stage


def deepspeed_config(cfg, use_gpu: bool, zero_stage: int | None = None) -> dict:
    """DeepSpeed engine config from the experiment's train/deepspeed sections (``zero_stage``
    overrides the configured stage, see :func:`effective_zero_stage`)."""
    ds = cfg.deepspeed
    stage = ds.zero_stage if zero_stage is None else int(zero_stage)
    zero: dict = {"stage": stage}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer and stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": cfg.train.grad_accum_steps,
        "gradient_clipping": cfg.train.grad_clip,
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.precision == "bf16":
        out["bf16"] = {"enabled": True}
    elif ds.precision == "fp16":
        out["fp16"] = {"enabled": True, "initial_scale_power": 12}
    return out


def lr_lambda(warmup: int, total: int, schedule: str = "cosine"):
    """Linear warm-up, then cosine decay to 5% of the peak ("cosine") or the peak held ("constant")."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def conv_weights_channels_last(module: torch.nn.Module) -> int:
    """Give every Conv2d weight the NHWC (channels-last) layout, in place; returns how many.

    oneDNN's CPU convolutions run faster on channels-last weights (their outputs follow, so the
    activations stay NHWC): about 6% of a ResNet-18 step at 128 px here. Only for ZeRO-0,
    which keeps the module's own tensors; ZeRO 1-3 swap the parameters for views of flat
    buffers. Called after ``deepspeed.initialize``, whose start-up broadcast views every
    parameter as bytes and needs standard strides. ``.to(memory_format=...)`` restrides even a
    1-channel stem (where ``.contiguous`` would keep the ambiguous strides), so the first
    activation is already NHWC and no layer mixes layouts.
    """
    n = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.weight.data = m.weight.data.to(memory_format=torch.channels_last)
            n += 1
    return n


def _channels_last_applies(engine, cfg) -> bool:
    """CPU, ZeRO-0 with DeepSpeed keeping the client optimizer as it is (fp32: no fp16/bf16
    wrapper re-pointing parameters at flat buffers), and a ResNet (the measured case)."""
    from medfuse_core.models.vision import ResNetEncoder

    return (not cfg.scaling.use_gpu and engine.zero_optimization_stage() == 0
            and isinstance(engine.optimizer, torch.optim.Optimizer)
            and isinstance(getattr(engine.module, "vision_encoder", None), ResNetEncoder))


def consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """Full model weights on rank 0 (ZeRO-3 gathers the shards; a collective on every rank)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().to("cpu", copy=True) for k, v in engine.module.state_dict().items()}


def _unique_bytes(tensors, seen: set) -> int:
    """Bytes of the storages behind ``tensors`` not counted yet (views of one flat buffer count once)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        if storage.data_ptr() in seen:
            continue
        seen.add(storage.data_ptr())
        total += storage.nbytes()
    return total


def _flat_tensors(value) -> list:
    """Tensors in a tensor / list / dict (DeepSpeed keeps gradient partitions in all three)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _inner_optimizer(opt):
    """The torch optimizer under DeepSpeed's ZeRO / fp16 wrappers (the one holding Adam's state)."""
    while not isinstance(opt, torch.optim.Optimizer) and getattr(opt, "optimizer", None) is not None:
        opt = opt.optimizer
    return opt


def gradient_bytes(engine) -> dict:
    """Gradient storage this rank holds right after backward (before the step frees it).

    ZeRO 0/1: every parameter's ``.grad``; ZeRO-2: the rank's gradient partition
    (``grads_in_partition``, ``averaged_gradients``); ZeRO-3: ``grad_partitions_flat_buffer``.
    ``bucket_bytes``: DeepSpeed's reduce-bucket staging buffers (``ipg_buckets``), sized by
    ``reduce_bucket_size`` whatever the model (allocated, mostly untouched on CPU).
    """
    seen: set = set()
    opt = engine.optimizer
    grads = _unique_bytes([p.grad for p in engine.module.parameters()], seen)
    for name in ("grads_in_partition", "averaged_gradients", "grad_partitions_flat_buffer"):
        grads += _unique_bytes(_flat_tensors(getattr(opt, name, None)), seen)
    for group in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        grads += _unique_bytes([getattr(t, "grad", None) for t in getattr(opt, group, None) or []], seen)
    buckets = 0
    for bucket in (getattr(opt, "ipg_buckets", None) or {}).values():
        buckets += _unique_bytes(_flat_tensors(getattr(bucket, "buffer", None)), seen)
    return {"grads_bytes": grads, "bucket_bytes": buckets}


def state_bytes(engine) -> dict:
    """Parameter and optimizer storage this rank holds between steps.

    ``params_bytes``: the module's weights resident here (ZeRO 0-2: the full model; ZeRO-3:
    this rank's ``ds_tensor`` partitions, plus the small parameters ZeRO-3 keeps whole);
    ``master_params_bytes``: a separate fp32 master partition the optimizer updates
    (ZeRO-1/2: ``single_partition_of_fp32_groups``, a copy even in fp32; ZeRO-3 in fp32 updates
    its partitions in place, so 0); ``optimizer_bytes``: the torch optimizer's state tensors
    (Adam's moments and step counters).
    """
    seen: set = set()
    params = list(engine.module.parameters())
    params_bytes = _unique_bytes([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params], seen)
    opt = engine.optimizer
    master = 0
    for group in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        master += _unique_bytes(list(getattr(opt, group, None) or []), seen)
    inner = _inner_optimizer(opt)
    optimizer_bytes = _unique_bytes([t for st in getattr(inner, "state", {}).values() for t in _flat_tensors(st)], seen)
    return {"params_bytes": params_bytes, "master_params_bytes": master, "optimizer_bytes": optimizer_bytes}


class _MlflowSink:
    """Rank-0 metric logging straight to the tracking store (no barrier per step)."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool):
        self.client = None
        if enabled and uri and run_id:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri=uri)
            self.run_id = run_id
        self.floors: dict[str, int] = {}  # per key: steps at or below this are already in the run's history

    def resume_after(self) -> None:
        """A restarted run: a (key, step) this run already logged, before the checkpoint or by a
        failed attempt that got further (with or without a checkpoint), is not logged again, so the history stays that of one
        continuous run. Per key: an attempt killed between an epoch's last loss and its
        validation logged the one but not the other."""
        if self.client is None:
            return
        for key in self.client.get_run(self.run_id).data.metrics:
            steps = [m.step for m in self.client.get_metric_history(self.run_id, key)]
            self.floors[key] = max(steps, default=-1)

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if v == v and step > self.floors.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class EpochStream:
    """One epoch of training batches, read by a background thread ahead of the steps.

    Opened as soon as the previous epoch's steps end (the first one before the model is
    built), so Ray Data's start-up and the local shuffle buffer's fill overlap validation,
    checkpointing and model set-up instead of stalling the first step. It yields at most
    ``limit`` batches (the equal per-rank step count), then closes the Ray iterator so its
    executor stops; batches come out in the iterator's order, so epochs stay reproducible.
    ``depth`` batches of rows wait at most in the queue.
    """

    def __init__(self, open_iter, limit: int, depth: int = 4):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(open_iter, limit), daemon=True,
                                        name="medfuse-epoch-stream")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, open_iter, limit: int) -> None:
        it = None
        try:
            it = iter(open_iter())
            for _ in range(limit):
                rows = next(it, None)
                if rows is None or not self._put(rows):
                    break
            self._put(None)
        except BaseException as exc:  # handed to the consumer, raised there
            self._put(_Failure(exc))
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:  # noqa: BLE001 - the epoch's data is already delivered
                    pass

    def next(self):
        """The next batch of rows, or None at the end of the epoch (or after ``limit`` batches)."""
        item = self._queue.get()
        if isinstance(item, _Failure):
            raise item.exc
        if item is None:
            self._queue.put(None)  # stays at the end for later calls
        return item

    def close(self) -> None:
        """Stop reading (an unfinished epoch after an error); the thread ends by itself."""
        self._stop.set()
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass


def _report_memory(memory: dict, zero_stage: int, rank: int, world: int, sink, step: int) -> dict:
    """Every rank's figures to all (a collective, once); rank 0 logs its own as ``perf/mem/*`` and prints all."""
    import torch.distributed as dist

    ranks = [None] * world
    dist.all_gather_object(ranks, {"rank": rank, **memory})
    sink.log({f"perf/mem/{k}": v for k, v in memory.items()}, step)
    if rank == 0:
        mib = lambda v: f"{v / 2**20:.1f}"  # noqa: E731
        print(f"[medfuse] memory per rank, ZeRO-{zero_stage} (MiB): " + "; ".join(
            f"rank {r['rank']}: params {mib(r['params_bytes'])} grads {mib(r['grads_bytes'])} "
            f"optimizer {mib(r['optimizer_bytes'])} master {mib(r['master_params_bytes'])} "
            f"buckets {mib(r['bucket_bytes'])}" for r in ranks), flush=True)
    return {"zero_stage": zero_stage, "ranks": ranks}


def _validate(engine, loader_fn, world: int, rank: int, make, objective) -> dict[str, np.ndarray]:
    """Strided validation over the full split (every rank reads all of it, scores its share),
    the objective's per-sample outputs gathered on every rank.

    Every rank runs the same number of forwards, counted from the data every rank sees, and
    pads with a repeat of the first batch, so ZeRO-3 parameter gathers stay in step even when
    there are fewer batches than workers.
    """
    import torch.distributed as dist

    from medfuse_core.objectives import to_device

    parts: list[dict] = []
    done, n_batches, first = 0, 0, None
    device, bf16 = engine.device, engine.bfloat16_enabled()
    engine.eval()
    with torch.no_grad():
        for i, rows in enumerate(loader_fn()):
            n_batches += 1
            if first is None:
                first = rows
            if i % world != rank:
                continue
            parts.append(objective.eval_outputs(engine, to_device(make(rows), device, bf16)))
            done += 1
        n_rounds = math.ceil(n_batches / world)
        pad = to_device(make(first), device, bf16) if first is not None and done < n_rounds else None
        while done < n_rounds:
            objective.eval_outputs(engine, pad)
            done += 1
    engine.train()
    local = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else None
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    shares = [g for g in gathered if g is not None]
    return {k: np.concatenate([g[k] for g in shares]) for k in shares[0]} if shares else {}


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Ray Train entry point for every stage; ``loop_cfg`` holds the stage, the resolved config as
    JSON and run facts. The stage's objective (``cfg.objective.name``) supplies the model, the
    batches, the loss and the validation metrics; everything else is shared."""
    from medfuse_core.config import STAGE_SCHEMAS

    cfg = STAGE_SCHEMAS[loop_cfg.get("stage", "finetune")].model_validate_json(loop_cfg["config_json"])
    if not cfg.scaling.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    import ray.train

    from pipelines.runtime import quiet_third_party

    quiet_third_party()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(cfg.scaling.torch_threads or max(1, int(math.ceil(cfg.scaling.cpus_per_worker))))
    # the data stream starts first (below); DeepSpeed, the model and the engine load behind it
    # micro-batches per epoch: a whole number of optimizer steps, so every epoch (and checkpoint)
    # ends on an accumulation boundary
    accum = cfg.train.grad_accum_steps
    steps_per_epoch = max(1, loop_cfg["n_train"] // (world * cfg.train.batch_size * accum)) * accum
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validate")

    def open_epoch(epoch: int) -> EpochStream:
        return EpochStream(lambda: train_shard.iter_batches(
            batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
            prefetch_batches=PREFETCH_BATCHES,
            local_shuffle_buffer_size=cfg.train.shuffle_buffer_rows or None,
            local_shuffle_seed=derived_seed(cfg.train.seed, rank, epoch, 3)), limit=steps_per_epoch)

    # the epoch to run is known once the checkpoint (if any) is read; the stream opens right after
    # and reads while the model and the DeepSpeed engine are built
    # Ray restores the run's latest checkpoint: after a worker failure, and when the driver runs
    # again under the same run name and storage (a killed driver, or a later run with more epochs)
    checkpoint = ray.train.get_checkpoint()
    state = {"epoch": -1, "global_step": 0, "world_size": world}
    if checkpoint:
        with checkpoint.as_directory() as d:
            state = json.loads(open(os.path.join(d, TRAIN_STATE)).read())
            check_complete(d, state)  # a loud error, never a silent restart or a half-read state
        if rank == 0:
            print(f"[medfuse] resuming from the checkpoint of epoch {state['epoch'] + 1} "
                  f"(step {state['global_step']})", flush=True)
    stream = open_epoch(state["epoch"] + 1) if state["epoch"] + 1 < cfg.train.epochs else None

    import deepspeed

    from medfuse_core.models.bundle import save_bundle
    from medfuse_core.objectives import build_objective, to_device

    objective = build_objective(cfg)

    # a resumed run keeps the stage its checkpoints were written with (older ones: the configured)
    zero_stage = (int(state.get("zero_stage_run", cfg.deepspeed.zero_stage)) if checkpoint
                  else effective_zero_stage(cfg, world))
    state["zero_stage_run"] = zero_stage
    if rank == 0 and zero_stage != cfg.deepspeed.zero_stage:
        print(f"[medfuse] {world} worker: ZeRO-{cfg.deepspeed.zero_stage} would partition nothing; "
              f"DeepSpeed runs stage {zero_stage} (the same optimisation, fewer copies)", flush=True)

    labels = list(cfg.data.labels) if objective.stage == "finetune" else []
    # a resumed run has its own weights
    model, n = objective.initial_model(None if checkpoint else loop_cfg.get("init_from_bundle"))
    if n and rank == 0:
        print(f"[medfuse] init_from: {n} tensors from the starting model", flush=True)
    tokenizer = objective.tokenizer()
    text_encoder = getattr(model, "text_encoder", None)
    if zero_stage == 3 and getattr(text_encoder, "cache_rows", 0):
        text_encoder.cache_rows = 0  # partitioned parameters: every rank must run every forward
    total_steps = steps_per_epoch // accum * cfg.train.epochs  # optimizer steps (the LR schedule's clock)
    groups = model.param_groups(cfg.train.lr, cfg.train.text_lr, cfg.train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps, total_steps,
                                                                             cfg.train.lr_schedule))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, cfg.scaling.use_gpu, zero_stage))

    if world == 1 and zero_stage == 0:
        # one rank: the gradient all-reduce is an identity, yet DeepSpeed would flatten, "reduce"
        # and copy back every gradient each step (~5% of a ResNet-18 step on CPU)
        engine.enable_backward_allreduce = False
    if _channels_last_applies(engine, cfg):
        conv_weights_channels_last(engine.module.vision_encoder)
    average = maybe_average(engine.module, cfg.train.ema_decay)  # after the layout change: same strides

    expected = trainable_names(model)
    if not checkpoint:
        state["trainable"] = expected
    elif state.get("trainable") != expected:  # frozen parameters are not saved, hence strict=False
        if stream is not None:
            stream.close()
        raise RuntimeError("resume: the checkpoint's trained parameters are not the ones this model "
                           "trains (the model code or its freezing changed); use a new workdir")
    else:
        with checkpoint.as_directory() as d, weights_only_loading():
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)
            if average is not None:
                average.load(d)

    sink = _MlflowSink(loop_cfg.get("tracking_uri"), loop_cfg.get("mlflow_run_id"), rank == 0)
    # also without a checkpoint: an attempt killed after logging its first validation but
    # before Ray registered that epoch's checkpoint starts over in the same run
    sink.resume_after()
    generator = torch.Generator()

    def make(rows, train=False):
        return objective.make_batch(rows, tokenizer, train=train, generator=generator)

    bf16 = engine.bfloat16_enabled()

    global_bs = cfg.train.batch_size * world

    memory = None
    for epoch in range(state["epoch"] + 1, cfg.train.epochs):
        # every random stream is a function of (seed, rank, epoch): a resumed run repeats an uninterrupted one
        generator.manual_seed(derived_seed(cfg.train.seed, rank, epoch, 1))
        torch.manual_seed(derived_seed(cfg.train.seed, rank, epoch, 2))
        engine.train()
        t_epoch = time.time()
        t_window, n_window = time.time(), 0
        losses: list[torch.Tensor] = []  # kept on the device; read (a sync) only at log steps and epoch end
        step_in_epoch = 0
        data_wait = prep = first_wait = 0.0
        try:
            while step_in_epoch < steps_per_epoch:  # equal step counts on every rank keep collectives in step
                t0 = time.perf_counter()
                rows = stream.next()
                t1 = time.perf_counter()
                if step_in_epoch == 0:
                    first_wait = t1 - t0
                if rows is None:
                    break
                batch = to_device(make(rows, train=True), engine.device, bf16)
                data_wait, prep = data_wait + (t1 - t0), prep + (time.perf_counter() - t1)
                loss = objective.loss(engine, batch)
                engine.backward(loss)
                if memory is None:  # once per process: what ZeRO leaves on this rank (grads peak before the step)
                    memory = gradient_bytes(engine)
                engine.step()
                step_in_epoch += 1
                n_window += global_bs
                losses.append(loss.detach())
                if step_in_epoch % accum:
                    continue  # gradients accumulate; DeepSpeed stepped nothing
                if "params_bytes" not in memory:
                    memory.update(state_bytes(engine))
                    state["memory"] = _report_memory(memory, zero_stage, rank, world, sink,
                                                     state["global_step"] + 1)
                state["global_step"] += 1  # optimizer steps
                if average is not None:
                    average.update()
                if state["global_step"] % cfg.train.log_every_steps == 0:
                    dt = time.time() - t_window
                    sink.log({"train/loss": torch.stack(losses[-cfg.train.log_every_steps * accum:]).mean().item(),
                              "train/lr": scheduler.get_last_lr()[0] if scheduler else cfg.train.lr,
                              "perf/samples_per_sec": n_window / max(dt, 1e-9),
                              "train/epoch": epoch}, state["global_step"])
                    t_window, n_window = time.time(), 0
        except BaseException:
            stream.close()
            raise
        train_seconds = time.time() - t_epoch
        # the next epoch's data starts flowing now, behind validation and the checkpoint
        stream = open_epoch(epoch + 1) if epoch + 1 < cfg.train.epochs else None

        val_loader = lambda: val_shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy")
        t_val = time.time()
        with applied(average):  # the average (when kept) is scored and saved; training goes on from the live weights
            objective.eval_begin(engine, tokenizer, engine.device)
            val = objective.val_metrics(_validate(engine, val_loader, world, rank, make, objective))
            # ZeRO-3 gathers on every rank (a collective); below it only rank 0 needs a copy
            weights = (consolidated_state_dict(engine, zero_stage)
                       if zero_stage == 3 or rank == 0 else None)
        validate_seconds = time.time() - t_val
        score = val.get(objective.score_key, float("nan"))
        score = score if score == score else 0.0
        metrics = {
            "epoch": epoch,
            "epochs_done": epoch + 1,  # a sweep scheduler's clock: stays right across resumes
            "global_step": state["global_step"],
            "train/loss_epoch": torch.stack(losses).mean().item() if losses else float("nan"),
            **val,
            objective.score_key: score,
            "perf/epoch_train_seconds": train_seconds,
            "perf/epoch_samples_per_sec": steps_per_epoch * global_bs / max(train_seconds, 1e-9),
            "perf/data_wait_fraction": data_wait / max(train_seconds, 1e-9),  # waiting on Ray Data
            "perf/batch_prep_fraction": prep / max(train_seconds, 1e-9),  # decode blobs, tokenise, augment
            "perf/first_batch_wait_seconds": first_wait,  # the epoch's first batch (stream start-up, buffer fill)
            "perf/epoch_validate_seconds": validate_seconds,
            "perf/torch_threads": torch.get_num_threads(),  # intra-op threads this worker computed with
        }
        if getattr(text_encoder, "cache_rows", 0):  # frozen text encoder: rows served from its output cache
            seen = text_encoder.cache_hits + text_encoder.cache_misses
            metrics["perf/text_cache_hit_fraction"] = text_encoder.cache_hits / max(1, seen)
        sink.log({k: v for k, v in metrics.items() if k not in ("epoch", "epochs_done", "global_step")}, state["global_step"])
        if rank == 0:
            print(f"[medfuse] epoch {epoch + 1}/{cfg.train.epochs}  step {state['global_step']}  "
                  f"loss {metrics['train/loss_epoch']:.4f}  {objective.score_key} {score:.3f}"
                  + (f" (image-only {val['val/auroc_macro_image_only']:.3f})" if "val/auroc_macro_image_only" in val
                     else "")
                  + (f" (zero-shot AUROC {val['val/zero_shot_auroc_macro']:.3f})" if "val/zero_shot_auroc_macro" in val
                     else "")
                  + f"  {metrics['perf/epoch_samples_per_sec']:.1f} samples/s",
                  flush=True)
        state["epoch"] = epoch
        state["score"] = score

        t_ckpt = time.time()
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
            if rank == 0:
                if average is not None:
                    average.save(tmp)
                save_bundle(engine.module, cfg.model, labels, cfg.data.image_size, os.path.join(tmp, BUNDLE_DIR),
                            state_dict=weights, tokenizer=tokenizer,
                            extra={**objective.bundle_extra(), "score_key": objective.score_key, "score": score,
                                   "epoch": epoch, "experiment": cfg.name, "stage": objective.stage,
                                   **({"val_auroc_macro": score} if objective.stage == "finetune" else {})})
                with open(os.path.join(tmp, TRAIN_STATE), "w") as fh:
                    json.dump(state, fh)
            write_rank_manifest(tmp, rank)
            ray.train.report({k.replace("/", "_"): v for k, v in metrics.items()},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
        # what saving and persisting the checkpoint cost (known only after the report that carries it)
        sink.log({"perf/epoch_checkpoint_seconds": time.time() - t_ckpt}, state["global_step"])
