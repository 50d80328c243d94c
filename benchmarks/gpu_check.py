"""GPU check: a short bf16 ZeRO-3 training of the LLM GPU experiment on one GPU.

One command (on a machine with one CUDA GPU)::

    python benchmarks/gpu_check.py --out gpu_check.json

It builds the model of ``experiments/finetune_cxr_llm_gpu.yaml`` (ViT-B/16 + a causal LM with
LoRA, activation checkpointing, cross-attention fusion). When the LM named there is not on disk
(no hub here) it builds an open Llama-architecture model of about 1.1 B parameters from a
transformers config instead (random weights: the check is about speed and memory, not quality).
It trains ``--steps`` steps with DeepSpeed ZeRO-3 in bf16 on synthetic images and token ids in
one process, and prints samples/s, peak GPU memory and model FLOPs utilisation (FLOPs of one
training step counted by ``torch.utils.flop_counter`` against the GPU's dense bf16 peak).
``--smoke`` runs the same code on CPU with a tiny LM and fp32 (for CI). Nothing in medfuse
depends on this script or on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# dense bf16 peak, TFLOP/s, by device name fragment (vendor data sheets, without sparsity)
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0}


def say(msg: str) -> None:
    print(f"[gpu-check] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(REPO / "experiments" / "finetune_cxr_llm_gpu.yaml"))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=None, help="default: the experiment's train.batch_size")
    p.add_argument("--smoke", action="store_true", help="CPU, tiny LM, fp32, 3 steps (checks the code path)")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    if args.smoke:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    from medfuse_core.experiment import load_config
    from medfuse_core.models.diagnosis import build_model
    from medfuse_core.models.tiny_lm import save_tiny_causal_lm
    from pipelines.train_loop import deepspeed_config

    overrides = []
    scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    cfg = load_config(args.config)
    if args.smoke:
        lm = save_tiny_causal_lm(scratch / "lm", "llama", hidden=64, layers=2, heads=2)
        overrides = [f"model.text.name_or_path={lm}", "data.image_size=64", "model.vision.name=vit_tiny",
                     "model.fusion.dim=64", "model.fusion.heads=2", "deepspeed.precision=fp32",
                     "scaling.use_gpu=false", "model.head.hidden=64"]
        args.steps = min(args.steps, 3)
        args.batch_size = args.batch_size or 2
    elif not Path(cfg.model.text.name_or_path).exists():
        lm = save_tiny_causal_lm(scratch / "llama-1b", "llama", hidden=2048, layers=16, heads=32, intermediate=8192)
        say(f"{cfg.model.text.name_or_path} is not on disk: using a Llama-architecture LM built from a config ({lm})")
        overrides.append(f"model.text.name_or_path={lm}")
    if cfg.model.vision.weights_path and not Path(cfg.model.vision.weights_path).exists():
        overrides.append("model.vision.weights_path=null")
    if args.batch_size:
        overrides.append(f"train.batch_size={args.batch_size}")
    overrides.append("train.grad_accum_steps=1")
    cfg = load_config(args.config, overrides)
    use_gpu = torch.cuda.is_available() and not args.smoke
    if not use_gpu and not args.smoke:
        say("no CUDA GPU here: run with --smoke to check the code path on CPU")
        return 2
    device = torch.device("cuda:0" if use_gpu else "cpu")
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")

    from medfuse_core.models.text import load_tokenizer

    labels = list(cfg.data.labels)
    model = build_model(cfg.model, len(labels), cfg.data.image_size)
    n_params = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    groups = model.param_groups(cfg.train.lr, cfg.train.text_lr, cfg.train.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg, use_gpu, 3))
    tokenizer = load_tokenizer(cfg.model.text.name_or_path)
    bs, size, tokens = cfg.train.batch_size, cfg.data.image_size, cfg.model.text.max_tokens
    g = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    images = torch.randn(bs, cfg.model.vision.in_channels, size, size, generator=g).to(device, dtype)
    ids = torch.randint(0, len(tokenizer), (bs, tokens), generator=g).to(device)
    mask = torch.ones(bs, tokens, dtype=torch.bool, device=device)
    mask[: bs // 2, tokens // 2:] = False  # half the rows padded: the masked paths run too
    targets = torch.randint(0, 2, (bs, len(labels)), generator=g).float().to(device)

    def step():
        out = engine(images, ids, mask)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(out["logits"].float(), targets)
        engine.backward(loss)
        engine.step()
        return loss

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()  # also the warm-up step
    flops_per_step = counter.get_total_flops()
    if use_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if use_gpu:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    name = torch.cuda.get_device_name(0) if use_gpu else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    achieved = flops_per_step * args.steps / seconds
    result = {
        "device": name, "params": n_params, "trained_params": n_trained, "batch_size": bs, "image_size": size,
        "max_tokens": tokens, "steps": args.steps, "seconds": seconds, "samples_per_sec": bs * args.steps / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2 ** 30 if use_gpu else None,
        "flops_per_step": flops_per_step, "achieved_tflops": achieved / 1e12,
        "mfu": achieved / (peak * 1e12) if peak and use_gpu else None, "final_loss": float(loss),
        "zero_stage": 3, "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
        "overrides": overrides,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
