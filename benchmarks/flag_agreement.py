#!/usr/bin/env python3
"""Drafts made to state their flags (``decoding.flag_agreement``): none / add / exact, paired.

One drafting pass per split with the model's own decoding settings (``flag_agreement=none``), the
head's flags at the model's thresholds (or, with ``--reference-flags``, each study's reference
labels); then each mode applied to those same drafts with the very function ``draft_batch`` calls,
so the rows differ only by the agreement step. Scored like ``medfuse evaluate`` (clinical F1 by the
rule labeler, BLEU-4, ROUGE-L) with macro F1 over the drawn findings first, plus how often a draft's
findings (read back by the labeler) equal its flags, and identifier leaks against ``--corpus``.

    python benchmarks/flag_agreement.py --model W --data SHARDS --split validate --out J [--reference-flags] \
        [--corpus CORPUS_ROOT ...] [--reuse] [decoding.KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from report_quality import _labelled_batches, corpus_identifiers, drawn_macro_f1, flag_scores, references  # noqa: E402

MODES = ("none", "add", "exact")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", type=Path, required=True, help="a report workdir (or its model/ bundle)")
    p.add_argument("--data", type=Path, required=True, help="ingested shards")
    p.add_argument("--split", default="validate")
    p.add_argument("--reference-flags", action="store_true", help="prompt with the reference labels, not the head")
    p.add_argument("--corpus", type=Path, action="append", default=[], help="corpus roots whose identifiers "
                   "no draft may hold (the training corpus's, the scored one's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--reuse", action="store_true", help="apply the modes to the drafts an earlier run of the same "
                   "--out saved (after a change to the agreement step), without drafting again")
    p.add_argument("overrides", nargs="*", help="decoding.KEY=VALUE")
    args = p.parse_args()

    import numpy as np
    import torch

    from medfuse_core.data.labels import CHEXPERT_LABELS
    from medfuse_core.evaluation.report_inference import decoding_settings, draft_batch, state_flags
    from medfuse_core.evaluation.report_labeler import rule_labeler
    from medfuse_core.evaluation.report_metrics import leaked_identifiers
    from medfuse_core.models.bundle import load_bundle
    from medfuse_core.models.report import guide_flags
    from pipelines.evaluate_report import score_drafts

    bundle_dir = args.model / "model" if (args.model / "model").is_dir() else args.model
    bundle = load_bundle(bundle_dir, device="cpu")
    mined = (bundle.extra or {}).get("flag_sentences")
    if not mined:
        print("error: the model keeps no flag sentences; retrain it with `medfuse train-report`", file=sys.stderr)
        return 2
    names = list(bundle.model.guide_labels)
    cuts = (bundle.extra or {}).get("guide_thresholds") or {}
    # reference labels have an opinion on every finding; the head none on those it never flags
    extra = {**bundle.extra, "guide_thresholds": {}} if args.reference_flags else bundle.extra
    settings = decoding_settings(bundle, [*args.overrides, "decoding.flag_agreement=none"])
    refs = references(args.data, args.split, with_ids=True)
    saved = args.out.with_name(f"{args.out.stem}_drafts.json")   # the drafting pass, for --reuse
    ids, drafts, flags, truth = [], [], [], []
    t0 = time.time()
    if args.reuse and saved.exists():
        keep_ = json.loads(saved.read_text())
        ids, drafts = keep_["ids"], keep_["drafts"]
        flags, truth = [np.asarray(keep_["flags"], dtype=bool)], [np.asarray(keep_["truth"], dtype=bool)]
    for rid, images, contexts, positives in ([] if ids else _labelled_batches(args.data, args.split, bundle)):
        if args.reference_flags:
            f = torch.from_numpy(positives)
        else:
            with torch.no_grad():
                _, f = guide_flags(bundle.model, images, [cuts.get(n, 0.5) for n in names])
        drafts += draft_batch(bundle, images, contexts, settings, flags=f)
        flags.append(f.numpy())
        truth.append(positives)
        ids += rid
        print(f"[flag-agreement] {len(ids)} images drafted ({time.time() - t0:.0f} s)", flush=True)
    flags = np.concatenate(flags)
    saved.parent.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps({"ids": ids, "drafts": drafts, "flags": flags.tolist(),
                                 "truth": np.concatenate(truth).tolist()}))
    # the flags themselves against the study labels: what a draft stating exactly its flags would score
    head = flag_scores(flags, np.concatenate(truth), names)
    keep = [k for k, r in enumerate(ids) if refs.get(r, "").strip()]
    cols = [CHEXPERT_LABELS.index(n) for n in names if n != "No Finding"]
    scope = [j for j, n in enumerate(names) if n != "No Finding"]
    identifiers = sorted({i for c in args.corpus for i in corpus_identifiers(c)})
    out = {"command": " ".join(sys.argv), "model": str(bundle_dir), "data": str(args.data), "split": args.split,
           "flags": "reference labels" if args.reference_flags else "findings head", "n": len(keep),
           "draft_seconds": time.time() - t0, "modes": {},
           "flags_f1": head["f1"], "flags_f1_macro_drawn": head["f1_macro_drawn"]}
    for mode in MODES:
        texts = state_flags(drafts, flags, names, extra, mode)
        m = score_drafts([texts[k] for k in keep], [refs[ids[k]] for k in keep])
        m["clinical_efficacy"]["f1_macro_drawn"] = drawn_macro_f1(m["clinical_efficacy"])
        read = rule_labeler([texts[k] for k in keep])[:, cols] == 1.0
        m["finding_states_equal_to_flags"] = float((read == flags[keep][:, scope]).mean())
        m["identifier_leaks"] = len(leaked_identifiers(texts, identifiers)) if identifiers else None
        out["modes"][mode] = m
        with open(args.out.with_name(f"{args.out.stem}_{mode}.csv"), "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["record_id", "report", "reference"])
            w.writerows([ids[k], texts[k], refs[ids[k]]] for k in keep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\n{args.split}, {len(keep)} images, flags from the {out['flags']}:\n\n| flag_agreement | macro F1 drawn | "
          "macro F1-14 | micro F1-14 | macro F1-5 | BLEU-4 | ROUGE-L | states = flags | leaks |\n"
          "|---|--:|--:|--:|--:|--:|--:|--:|--:|")
    for mode, m in out["modes"].items():
        ce = m["clinical_efficacy"]
        print(f"| {mode} | {ce['f1_macro_drawn']:.3f} | {ce['f1_macro_14']:.3f} | {ce['f1_micro_14']:.3f} | "
              f"{ce['f1_macro_5']:.3f} | {m['bleu4']:.3f} | {m['rouge_l']:.3f} | "
              f"{m['finding_states_equal_to_flags']:.3f} | {m['identifier_leaks']} |")
    print(f"\nthe flags against the study labels: macro F1 over the drawn findings {out['flags_f1_macro_drawn']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
