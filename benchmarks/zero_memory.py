"""Per-worker memory under ZeRO 0, 2 and 3 with a causal LM as the language side (2 workers).

One command::

    python benchmarks/zero_memory.py --out benchmarks/results/zero_memory.json

It builds a small Llama-family causal LM from a transformers config (``--hidden``, ``--layers``;
the defaults give about 30 M parameters, most of them in the LM), saves it to a folder, and runs
``medfuse finetune`` for one epoch on a small synthetic corpus with the LM fully trainable, under
ZeRO stages 0, 2 and 3 with 2 workers (gloo on CPU), plus one LoRA run at ZeRO-3. The training
loop measures each rank's resident parameters, gradients (right after ``backward``), Adam state
and fp32 master copies and stores them in the checkpoint; this script prints them as a table and
writes JSON with the machine's facts. It measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
MiB = 2 ** 20


def say(msg: str) -> None:
    print(f"[zero-memory] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/medfuse-bench/zero-memory"))
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "zero_memory.json")
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--studies", type=int, default=120)
    p.add_argument("--stages", type=int, nargs="*", default=[0, 2, 3])
    args = p.parse_args(argv)

    from decode import machine_facts
    from medfuse_core.config import IngestConfig
    from medfuse_core.data.synth import generate_corpus
    from medfuse_core.experiment import load_config
    from medfuse_core.models.tiny_lm import save_tiny_causal_lm
    from pipelines import finetune, ingest
    from pipelines.runtime import init_ray

    args.work.mkdir(parents=True, exist_ok=True)
    lm = args.work / f"llama-h{args.hidden}-l{args.layers}"
    if not (lm / "config.json").exists():
        save_tiny_causal_lm(lm, "llama", hidden=args.hidden, layers=args.layers, heads=max(1, args.hidden // 64))
    data = args.work / f"data-{args.studies}"
    init_ray(num_cpus=2)
    if not (data / "ingest_summary.json").exists():
        corpus = args.work / f"corpus-{args.studies}"
        if not corpus.exists():
            generate_corpus(corpus, n_studies=args.studies, seed=5)
        ingest.run("mimic-cxr", corpus, data, IngestConfig(image_size=48))
    base = ["data.image_size=48", f"model.text.name_or_path={lm}", "model.text.max_tokens=32",
            "model.fusion.dim=64", "model.fusion.heads=2", "train.batch_size=8", "train.epochs=1",
            "train.warmup_steps=1", "scaling.num_workers=2", "scaling.cpus_per_worker=0.5",
            "train.ema_decay=0"]  # ZeRO-3 keeps no weight average (each rank holds a shard)
    cases = [(f"ZeRO-{z}, LM fully trained", base + [f"deepspeed.zero_stage={z}", "model.text.trainable_layers=-1"], z)
             for z in args.stages]
    cases.append(("ZeRO-3, LoRA r=8 on the LM", base + ["deepspeed.zero_stage=3", "model.text.lora.r=8"], 3))
    results = []
    for name, overrides, zero in cases:
        workdir = args.work / "runs" / name.split(",")[0].replace(" ", "").lower() / ("lora" if "LoRA" in name else "full")
        cfg = load_config(REPO / "experiments" / "finetune_cxr_cpu.yaml", overrides)
        say(f"{name}: training one epoch")
        t0 = time.perf_counter()
        facts = finetune.run(cfg, data, workdir)
        states = [s for s, _ in finetune.find_checkpoints(facts["checkpoint_storage"])]
        memory = max(states, key=lambda s: s["global_step"])["memory"]
        results.append({"case": name, "zero_configured": zero, "memory": memory,
                        "wall_seconds": time.perf_counter() - t0, "overrides": overrides})
    lines = ["| case | ZeRO run | rank | params MiB | grads MiB | Adam state MiB | fp32 master MiB | total MiB |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for r in results:
        for rank in r["memory"]["ranks"]:
            total = sum(rank[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "master_params_bytes"))
            lines.append(f"| {r['case']} | {r['memory']['zero_stage']} | {rank['rank']} | "
                         f"{rank['params_bytes'] / MiB:.1f} | {rank['grads_bytes'] / MiB:.1f} | "
                         f"{rank['optimizer_bytes'] / MiB:.1f} | {rank['master_params_bytes'] / MiB:.1f} | "
                         f"{total / MiB:.1f} |")
    table = "\n".join(lines)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine_facts(), "lm": {"family": "llama", "hidden": args.hidden,
                                                                       "layers": args.layers},
                                    "results": results, "table_markdown": table}, indent=2))
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
