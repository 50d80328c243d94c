"""Console output shared by the commands: progress bars and result tables (rich)."""

from __future__ import annotations

import json


class UsageError(Exception):
    """Bad command-line input; the command exits with code 2."""


def print_ingest(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ingest", show_header=False)
    for key in ("n_records", "n_ok", "n_quarantined", "n_filtered"):
        table.add_row(key, str(summary[key]))
    table.add_row("quarantine_by_reason", json.dumps(summary["quarantine_by_reason"]))
    table.add_row("splits", json.dumps(summary["splits"]))
    Console().print(table)


def print_results(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    if result.get("kind") == "report":
        rg = result["report_generation"]
        ce = rg["clinical_efficacy"]
        table = Table(title=f"report model, test split ({result['n_test']} drafts)")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for key in ("bleu4", "rouge_l", "findings_and_impression_rate"):
            table.add_row(key, f"{rg[key]:.3f}")
        for key in ("f1_micro_14", "f1_macro_14", "f1_micro_5", "f1_macro_5"):
            table.add_row(f"clinical {key}", f"{ce[key]:.3f}")
        table.add_row("drafts with text to redact", str(rg["phi_suspect_drafts"]))
        table.add_row("drafts ending mid-sentence", str(rg["drafts_ending_mid_sentence"]))
        Console().print(table)
        return

    if result.get("kind") == "contrastive":
        zs, rt = result["zero_shot"], result["retrieval"]
        table = Table(title=f"pretrained model, test split ({result['n_test']} images)")
        table.add_column("zero-shot label")
        table.add_column("AUROC", justify="right")
        for name, value in zs["auroc"].items():
            table.add_row(name, f"{value:.3f}")
        table.add_row("[bold]auroc_macro", f"[bold]{zs['auroc_macro']:.3f}")
        for direction in ("image_to_text", "text_to_image"):
            table.add_row(f"retrieval {direction}", "  ".join(f"{k} {v:.3f}" for k, v in rt[direction].items()))
        Console().print(table)
        return

    table = Table(title=f"test split ({result['n_test']} images)")
    table.add_column("label")
    for mode in ("image_only", "image_text"):
        table.add_column(f"AUROC {mode}", justify="right")
    for name in result["label_names"]:
        if name in result["image_text"]["auroc"]:
            table.add_row(name, *(f"{result[m]['auroc'].get(name, float('nan')):.3f}"
                                  for m in ("image_only", "image_text")))
    for key in ("auroc_macro", "auprc_macro", "f1_macro"):
        table.add_row(f"[bold]{key}", *(f"[bold]{result[m][key]:.3f}" for m in ("image_only", "image_text")))
    Console().print(table)


def print_sweep(facts: dict) -> None:
    """The sweep's trials (status, drawn values, best metric) and the registered best model."""
    from rich.console import Console
    from rich.table import Table

    trials = facts.get("trials", [])
    keys = list(trials[0]["params"]) if trials else []
    best = facts.get("best") or {}
    table = Table(title=f"sweep {facts.get('name')} ({len(trials)} trials)")
    for col in ["trial", "status", "epochs", *keys, "best metric"]:
        table.add_column(col, justify="right" if col in ("epochs", "best metric") else "left")
    for t in trials:
        mark = "[bold]" if t["trial_id"] == best.get("trial_id") else ""
        table.add_row(mark + t["trial_id"], t["status"], str(t["epochs_done"]),
                      *(f"{v:.3g}" if isinstance(v, float) else str(v) for v in (t["params"][k] for k in keys)),
                      f"{t['metric_best']:.4f}")
    Console().print(table)
    if best:
        shown = {k: best.get(k) for k in ("trial_id", "metric", "score", "mlflow_run_id")}
        shown["model_uri"] = best.get("model_uri") or best.get("trial_model_uri")
        print(json.dumps(shown, indent=2))


def with_progress(title: str, fn):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=False) as progress:
        task = progress.add_task(title, total=None)

        def cb(done, total):
            progress.update(task, completed=done, total=total)

        return fn(cb)




class progress_bar:
    """``with progress_bar("generate", total) as advance: advance(n)``: a rich bar on a terminal
    (``MEDFUSE_PROGRESS=0`` turns it off), else a log line every tenth of the total."""

    def __init__(self, title: str, total: int | None):
        import os
        import sys

        self.title, self.total, self.done, self._next = title, total, 0, 0.1
        self._progress = None
        if os.environ.get("MEDFUSE_PROGRESS", "1") != "0" and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

            self._progress = Progress("[progress.description]{task.description}", BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn())

    def __enter__(self):
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(self.title, total=self.total)
        return self.advance

    def advance(self, n: int) -> None:
        import logging

        self.done += n
        if self._progress is not None:
            self._progress.update(self._task, completed=self.done)
        elif self.total and self.done >= self._next * self.total:
            logging.getLogger("medfuse").info("%s: %d of %d", self.title, self.done, self.total)
            self._next = (int(self.done * 10 / self.total) + 1) / 10

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
        return False
