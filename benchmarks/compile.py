"""Does ``torch.compile`` pay on CPU for the shipped model? Eager against compiled, in one process.

One command::

    python benchmarks/compile.py --out benchmarks/results/compile.json

The CPU experiment's diagnosis model (``experiments/finetune_cxr_cpu.yaml``: ResNet-18 at its
image size, gated fusion, head), built by the same ``build_model`` the trainer uses, on random
images of one training batch (the experiment's ``train.batch_size``), one torch thread (what a
Ray Train worker on the CPU experiment gets), image-only forward (the context's text encoder is
frozen and cached in that experiment, so the vision side is the step's cost). Variants:

* a training step (forward, masked BCE, backward, AdamW step): eager contiguous (the baseline),
  eager channels-last (what the trainer runs at ZeRO-0), ``torch.compile`` of the vision encoder
  (inductor, default mode) contiguous and channels-last;
* a scoring forward (``torch.no_grad``, eval mode, batch 64): eager and compiled.

For each compiled variant the first calls' seconds (the compile) are reported apart; steady
figures are interleaved rounds (median and best seconds per call), so a shared machine's load
hits every variant alike. Ratios are against the eager contiguous baseline of the same run.
It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

CPU_EXPERIMENT = REPO / "experiments" / "finetune_cxr_cpu.yaml"


def say(msg: str) -> None:
    print(f"[compile-bench] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compile.json")
    args = p.parse_args(argv)

    import torch

    from decode import machine_facts
    from medfuse_core.experiment import load_config
    from medfuse_core.models import build_model
    from pipelines.train_loop import conv_weights_channels_last
    from trainer import _timed_rounds, plain_step

    torch.set_num_threads(args.threads)
    cfg = load_config(CPU_EXPERIMENT, [])
    bs, size, n = cfg.train.batch_size, cfg.data.image_size, len(cfg.data.labels)
    x = torch.randn(bs, 1, size, size, generator=torch.Generator().manual_seed(1))
    y = (torch.rand(bs, n, generator=torch.Generator().manual_seed(2)) > 0.7).float()
    w = torch.ones_like(y)
    xs = torch.randn(64, 1, size, size, generator=torch.Generator().manual_seed(3))

    def fresh(channels_last: bool, compiled: bool):
        torch.manual_seed(0)
        m = build_model(cfg.model, num_labels=n, image_size=size).train()
        if channels_last:
            conv_weights_channels_last(m)
        if compiled:
            m.vision_encoder = torch.compile(m.vision_encoder)
        return m

    def train_step(channels_last: bool, compiled: bool):
        m = fresh(channels_last, compiled)
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=cfg.train.lr)
        return plain_step(m, opt, x, y, w, cfg.train.grad_clip)

    def score(compiled: bool):
        m = fresh(False, compiled).eval()

        def fwd():
            with torch.no_grad():
                m(xs)
        return fwd

    def first_calls(fn, calls: int = 3) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - t0

    result = {"command": "python benchmarks/compile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": machine_facts(), "load_avg_start": list(os.getloadavg()), "threads": args.threads,
              "batch_size": bs, "image_size": size, "model": {"vision": cfg.model.vision.name,
                                                                "fusion": cfg.model.fusion.name}}
    for kind, variants in (
        ("train_step", {"eager, contiguous": train_step(False, False),
                        "eager, channels-last": train_step(True, False),
                        "compiled, contiguous": train_step(False, True),
                        "compiled, channels-last": train_step(True, True)}),
        ("score_forward_batch64", {"eager": score(False), "compiled": score(True)}),
    ):
        compile_s = {}
        for name, fn in variants.items():
            compile_s[name] = first_calls(fn)
            say(f"{kind} / {name}: first 3 calls {compile_s[name]:.1f} s")
        timed = _timed_rounds(variants, rounds=args.rounds, per_round=2)
        base = timed[next(iter(variants))]["median_s"]
        result[kind] = {name: {**t, "first_3_calls_s": compile_s[name], "speed_vs_eager": base / t["median_s"]}
                        for name, t in timed.items()}
        for name, t in result[kind].items():
            say(f"{kind} / {name}: median {t['median_s'] * 1000:.0f} ms (best {t['best_s'] * 1000:.0f} ms), "
                f"{t['speed_vs_eager']:.2f}x eager")
    result["load_avg_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    rows = ["| case | first 3 calls s | median ms (best) | vs eager |", "|---|--:|--:|--:|"]
    for kind in ("train_step", "score_forward_batch64"):
        for name, t in result[kind].items():
            rows.append(f"| {kind}: {name} | {t['first_3_calls_s']:.1f} | {t['median_s'] * 1000:.0f} "
                        f"({t['best_s'] * 1000:.0f}) | {t['speed_vs_eager']:.2f}x |")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
