"""The per-worker training loop (runs inside Ray Train workers, one DeepSpeed engine each).

Reads top to bottom: build model -> DeepSpeed engine -> restore -> for each epoch: train steps
(per-step metrics to MLflow from rank 0), validation, checkpoint through ``ray.train.report``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from contextlib import contextmanager

import numpy as np
import torch

TRAIN_STATE = "train_state.json"
DS_TAG = "deepspeed"
BUNDLE_DIR = "bundle"
RANKS_DIR = "ranks"  # one manifest per rank, written after its part of the checkpoint


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, rank, epoch, ...) without collisions between the parts."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint64)[0] >> 1)


def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters the optimizer trains (what a checkpoint must hold)."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def write_rank_manifest(folder: str, rank: int) -> None:
    """List every file this rank wrote into its checkpoint folder (with sizes), as the last step."""
    files = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            files[os.path.relpath(path, folder)] = os.path.getsize(path)
    os.makedirs(os.path.join(folder, RANKS_DIR), exist_ok=True)
    with open(os.path.join(folder, RANKS_DIR, f"rank-{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "files": files}, fh)


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


def deepspeed_config(cfg, use_gpu: bool) -> dict:
    """DeepSpeed engine config from the experiment's train/deepspeed sections."""
    ds = cfg.deepspeed
    zero: dict = {"stage": ds.zero_stage}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer and ds.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": cfg.train.batch_size,
        "gradient_accumulation_steps": 1,
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


def lr_lambda(warmup: int, total: int):
    """Linear warm-up then cosine decay to 5% of the peak."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def consolidated_state_dict(engine, zero_stage: int) -> dict | None:
    """Full model weights on rank 0 (ZeRO-3 gathers the shards; a collective on every rank)."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}


class _MlflowSink:
    """Rank-0 metric logging straight to the tracking store (no barrier per step)."""

    def __init__(self, uri: str | None, run_id: str | None, enabled: bool):
        self.client = None
        if enabled and uri and run_id:
            import mlflow

            self.client = mlflow.MlflowClient(tracking_uri=uri)
            self.run_id = run_id

    def log(self, metrics: dict, step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)


def _validate(engine, loader_fn, world: int, rank: int, make) -> tuple[np.ndarray, ...]:
    """Strided validation over the full split (every rank reads all of it, scores its share).

    Every rank runs the same number of forwards, counted from the data every rank sees, and
    pads with a repeat of the first batch, so ZeRO-3 parameter gathers stay in step even when
    there are fewer batches than workers.
    """
    import torch.distributed as dist

    probs_txt, probs_img, labels = [], [], []
    done, n_batches, first = 0, 0, None
    engine.eval()
    with torch.no_grad():
        for i, rows in enumerate(loader_fn()):
            n_batches += 1
            if first is None:
                first = rows
            if i % world != rank:
                continue
            batch = make(rows)
            probs_txt.append(torch.sigmoid(_forward(engine, batch, text=True)).float().cpu().numpy())
            probs_img.append(torch.sigmoid(_forward(engine, batch, text=False)).float().cpu().numpy())
            labels.append(batch["eval_labels"].numpy())
            done += 1
        n_rounds = math.ceil(n_batches / world)
        pad = make(first) if first is not None and done < n_rounds else None
        while done < n_rounds:
            _forward(engine, pad, text=True)
            _forward(engine, pad, text=False)
            done += 1
    engine.train()
    local = (np.concatenate(probs_txt) if probs_txt else None, np.concatenate(probs_img) if probs_img else None,
             np.concatenate(labels) if labels else None)
    gathered = [None] * world
    dist.all_gather_object(gathered, local)
    parts = [g for g in gathered if g[0] is not None]
    return tuple(np.concatenate([p[k] for p in parts]) for k in range(3))


def _forward(engine, batch: dict, text: bool) -> torch.Tensor:
    device = engine.device
    kwargs = {}
    if text:
        kwargs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask", "text_present")}
    images = batch["images"].to(device)
    if engine.bfloat16_enabled():
        images = images.bfloat16()
    elif engine.fp16_enabled():
        images = images.half()
    return engine(images, **kwargs)["logits"]


def train_loop_per_worker(loop_cfg: dict) -> None:
    """Ray Train entry point; ``loop_cfg`` holds the resolved config as JSON and run facts."""
    from medfuse_core.config import FinetuneConfig

    cfg = FinetuneConfig.model_validate_json(loop_cfg["config_json"])
    if not cfg.scaling.use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"  # before DeepSpeed picks its accelerator
    import deepspeed
    import ray.train

    from medfuse_core.batching import make_batch
    from medfuse_core.losses import masked_bce_with_logits
    from medfuse_core.metrics import multilabel_metrics
    from medfuse_core.models import build_model, load_tokenizer
    from medfuse_core.models.bundle import save_bundle

    from pipelines.runtime import quiet_third_party

    quiet_third_party()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    np.random.seed(cfg.train.seed + rank)
    if not cfg.scaling.use_gpu:
        torch.set_num_threads(max(1, int(math.ceil(cfg.scaling.cpus_per_worker))))

    labels = cfg.data.labels
    model = build_model(cfg.model, num_labels=len(labels), image_size=cfg.data.image_size)
    tokenizer = load_tokenizer(cfg.model.text.name_or_path)
    steps_per_epoch = max(1, loop_cfg["n_train"] // (world * cfg.train.batch_size))
    total_steps = steps_per_epoch * cfg.train.epochs
    groups = model.param_groups(cfg.train.lr, cfg.train.text_lr, cfg.train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.train.warmup_steps, total_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, cfg.scaling.use_gpu))

    expected = trainable_names(model)
    state = {"epoch": -1, "global_step": 0, "world_size": world, "trainable": expected}
    # Ray's own restore (worker restart) wins; else the driver's pick from an earlier run in this workdir
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and loop_cfg.get("resume_from"):
        checkpoint = ray.train.Checkpoint.from_directory(loop_cfg["resume_from"])
    if checkpoint:
        with checkpoint.as_directory() as d, weights_only_loading():
            state = json.loads(open(os.path.join(d, TRAIN_STATE)).read())
            if state.get("trainable") != expected:  # frozen parameters are not saved, hence strict=False
                raise RuntimeError("resume: the checkpoint's trained parameters are not the ones this model "
                                   "trains (the model code or its freezing changed); use a new workdir")
            engine.load_checkpoint(d, tag=DS_TAG, load_module_strict=False)

    sink = _MlflowSink(loop_cfg.get("tracking_uri"), loop_cfg.get("mlflow_run_id"), rank == 0)
    generator = torch.Generator()

    def make(rows, train=False):
        return make_batch(rows, tokenizer, labels=labels, image_size=cfg.data.image_size,
                          max_tokens=cfg.model.text.max_tokens, uncertain_policy=cfg.data.uncertain_policy,
                          blank_policy=cfg.data.blank_policy, train=train, text_dropout=cfg.data.text_dropout, augment_images=cfg.data.augment,
                          generator=generator)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validate")
    global_bs = cfg.train.batch_size * world

    for epoch in range(state["epoch"] + 1, cfg.train.epochs):
        # every random stream is a function of (seed, rank, epoch): a resumed run repeats an uninterrupted one
        generator.manual_seed(derived_seed(cfg.train.seed, rank, epoch, 1))
        torch.manual_seed(derived_seed(cfg.train.seed, rank, epoch, 2))
        engine.train()
        t_epoch = time.time()
        t_window, n_window, losses = time.time(), 0, []
        step_in_epoch = 0
        batches = iter(train_shard.iter_batches(
            batch_size=cfg.train.batch_size, batch_format="numpy", drop_last=True,
            local_shuffle_buffer_size=cfg.train.shuffle_buffer_rows or None,
            local_shuffle_seed=derived_seed(cfg.train.seed, rank, epoch, 3)))
        data_wait = prep = 0.0
        while step_in_epoch < steps_per_epoch:  # equal step counts on every rank keep collectives in step
            t0 = time.perf_counter()
            rows = next(batches, None)
            t1 = time.perf_counter()
            if rows is None:
                break
            batch = make(rows, train=True)
            data_wait, prep = data_wait + (t1 - t0), prep + (time.perf_counter() - t1)
            logits = _forward(engine, batch, text=True)
            loss = masked_bce_with_logits(logits.float(), batch["targets"].to(engine.device),
                                          batch["weights"].to(engine.device))
            engine.backward(loss)
            engine.step()
            state["global_step"] += 1
            step_in_epoch += 1
            n_window += global_bs
            losses.append(loss.item())
            if state["global_step"] % cfg.train.log_every_steps == 0:
                dt = time.time() - t_window
                sink.log({"train/loss": float(np.mean(losses[-cfg.train.log_every_steps:])),
                          "train/lr": scheduler.get_last_lr()[0] if scheduler else cfg.train.lr,
                          "perf/samples_per_sec": n_window / max(dt, 1e-9),
                          "train/epoch": epoch}, state["global_step"])
                t_window, n_window = time.time(), 0
        train_seconds = time.time() - t_epoch

        val_loader = lambda: val_shard.iter_batches(batch_size=cfg.train.batch_size, batch_format="numpy")
        p_txt, p_img, y = _validate(engine, val_loader, world, rank, make)
        m_txt = multilabel_metrics(p_txt, y, labels)
        m_img = multilabel_metrics(p_img, y, labels)
        score = m_txt["auroc_macro"] if m_txt["auroc_macro"] == m_txt["auroc_macro"] else 0.0
        metrics = {
            "epoch": epoch,
            "global_step": state["global_step"],
            "train/loss_epoch": float(np.mean(losses)) if losses else float("nan"),
            "val/auroc_macro": score,
            "val/auroc_macro_image_only": m_img["auroc_macro"],
            "val/auprc_macro": m_txt["auprc_macro"],
            "perf/epoch_train_seconds": train_seconds,
            "perf/epoch_samples_per_sec": steps_per_epoch * global_bs / max(train_seconds, 1e-9),
            "perf/data_wait_fraction": data_wait / max(train_seconds, 1e-9),  # waiting on Ray Data
            "perf/batch_prep_fraction": prep / max(train_seconds, 1e-9),  # decode blobs, tokenise, augment
        }
        for name, value in m_txt["auroc"].items():
            metrics[f"val/auroc/{name.replace(' ', '_')}"] = value
        sink.log({k: v for k, v in metrics.items() if k not in ("epoch", "global_step")}, state["global_step"])
        if rank == 0:
            print(f"[medfuse] epoch {epoch + 1}/{cfg.train.epochs}  step {state['global_step']}  "
                  f"loss {metrics['train/loss_epoch']:.4f}  val AUROC {score:.3f} "
                  f"(image-only {m_img['auroc_macro']:.3f})  {metrics['perf/epoch_samples_per_sec']:.1f} samples/s",
                  flush=True)
        state["epoch"] = epoch
        state["score"] = score

        # ZeRO-3 gathers on every rank (a collective); below it only rank 0 needs a copy
        weights = (consolidated_state_dict(engine, cfg.deepspeed.zero_stage)
                   if cfg.deepspeed.zero_stage == 3 or rank == 0 else None)
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG, exclude_frozen_parameters=True)
            if rank == 0:
                save_bundle(engine.module, cfg.model, labels, cfg.data.image_size, os.path.join(tmp, BUNDLE_DIR),
                            state_dict=weights, tokenizer=tokenizer,
                            extra={"val_auroc_macro": score, "epoch": epoch, "experiment": cfg.name,
                                   "blank_policy": cfg.data.blank_policy,
                                   "uncertain_policy": cfg.data.uncertain_policy})
                with open(os.path.join(tmp, TRAIN_STATE), "w") as fh:
                    json.dump(state, fh)
            write_rank_manifest(tmp, rank)
            ray.train.report({k.replace("/", "_"): v for k, v in metrics.items()},
                             checkpoint=ray.train.Checkpoint.from_directory(tmp))
