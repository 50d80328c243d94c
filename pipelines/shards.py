"""The on-disk layout of an ingest output, and the column-projected, split-pruned reads of it.

::

    DATA/shards/split=<train|validate|test>/*.parquet   one row per ok image (hive-partitioned by split)
    DATA/outcomes/*.parquet                              one row per processed record: ids, status,
                                                         reason codes, no pixels, no text
    DATA/ingest_summary.json                             accounting, digest, quarantine list

Readers name the split they want and the columns they use, so a training or evaluation job
never lists another split's files nor moves the report text or header it does not need.
"""

from __future__ import annotations

from pathlib import Path

SHARDS_DIR = "shards"
OUTCOMES_DIR = "outcomes"
SPLITS = ("train", "validate", "test")

# What a diagnosis worker or scorer reads; the de-identified report stays in the shards for
# pretraining / report generation and is projected out here.
DIAGNOSIS_COLUMNS = ["image", "image_size", "context", "labels"]


def split_dir(data_dir: str | Path, split: str) -> Path:
    """The folder holding one split's shards."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(data_dir) / SHARDS_DIR / f"split={split}"


def has_split(data_dir: str | Path, split: str) -> bool:
    """True when ingest wrote at least one shard file for ``split``."""
    d = split_dir(data_dir, split)
    return d.is_dir() and any(d.glob("*.parquet"))


def read_split(data_dir: str | Path, split: str, columns: list[str], *, labelled_only: bool = False,
               shuffle_seed: int | None = None, **read_args):
    """A lazy Ray dataset of one split's shards with only ``columns`` read.

    ``labelled_only`` keeps rows whose study has labels (pushed into the Parquet scan).
    ``shuffle_seed`` shuffles the file order anew on every execution (reproducible from the
    seed); rows inside a file keep their order (workers add a local shuffle buffer).
    """
    import ray.data
    from ray.data import FileShuffleConfig
    from ray.data.expressions import col

    cols = list(dict.fromkeys(columns))
    args = dict(read_args)
    if shuffle_seed is not None:
        args["shuffle"] = FileShuffleConfig(seed=int(shuffle_seed), reseed_after_execution=True)
    ds = ray.data.read_parquet(str(split_dir(data_dir, split)), partitioning=None, **args)
    if labelled_only:  # the filter and the projection are pushed into the Parquet scan
        ds = ds.select_columns(list(dict.fromkeys(cols + ["labelled"]))).filter(expr=col("labelled") == True)  # noqa: E712
    return ds.select_columns(cols)


def read_split_table(data_dir: str | Path, split: str, columns: list[str], limit: int | None = None,
                     filter=None):
    """A small pyarrow table from one split, reading row groups only until ``limit`` rows are found."""
    import pyarrow as pa
    import pyarrow.dataset as pads

    d = split_dir(data_dir, split)
    if not has_split(data_dir, split):
        return None
    dataset = pads.dataset(str(d), format="parquet", partitioning=None)
    batches, n = [], 0
    for batch in dataset.to_batches(columns=columns, filter=filter, batch_size=max(1, min(limit or 1024, 1024))):
        if batch.num_rows == 0:
            continue
        batches.append(batch)
        n += batch.num_rows
        if limit is not None and n >= limit:
            break
    if not batches:
        return pa.Table.from_batches([], schema=dataset.schema.empty_table().select(columns).schema)
    table = pa.Table.from_batches(batches)
    return table.slice(0, limit) if limit is not None else table


def patient_share(patient_ids, seed: int):
    """Each (pseudonymous) patient's fixed position in [0, 1) for ``seed``: a study is in a
    label fraction F when its patient's share is below F, so every fraction is patient-level
    and the 10% set lies inside the 50% set of the same seed."""
    import hashlib

    import numpy as np

    return np.array([int.from_bytes(hashlib.sha256(f"{seed}:{p}".encode()).digest()[:8], "big") / 2.0**64
                     for p in patient_ids], dtype=np.float64)


def _keep_fraction(batch, fraction: float, seed: int):
    import pyarrow.compute as pc  # noqa: F401  (pyarrow batches in, filtered batches out)

    share = patient_share(batch.column("patient_id").to_pylist(), seed)
    return batch.filter(share < fraction)


def read_fraction(data_dir: str | Path, split: str, columns: list[str], fraction: float, seed: int, **kwargs):
    """``read_split`` restricted to the patients inside a seeded ``fraction`` (1.0: everything)."""
    if fraction >= 1.0:
        return read_split(data_dir, split, columns, **kwargs)
    ds = read_split(data_dir, split, list(dict.fromkeys(list(columns) + ["patient_id"])), **kwargs)
    ds = ds.map_batches(_keep_fraction, batch_format="pyarrow", fn_kwargs={"fraction": fraction, "seed": seed})
    return ds.select_columns(list(columns))


def count_fraction(data_dir: str | Path, split: str, fraction: float, seed: int, labelled_only: bool = True) -> dict:
    """Images and patients of ``split`` inside the fraction, streamed over the two id columns."""
    import pyarrow.dataset as pads

    n_images, patients = 0, set()
    if not has_split(data_dir, split):
        return {"images": 0, "patients": 0}
    dataset = pads.dataset(str(split_dir(data_dir, split)), format="parquet", partitioning=None)
    for batch in dataset.to_batches(columns=["patient_id", "labelled"], batch_size=65536):
        ids = batch.column("patient_id").to_pylist()
        labelled = batch.column("labelled").to_pylist()
        share = patient_share(ids, seed)
        for pid, lab, s in zip(ids, labelled, share):
            if s < fraction and (lab or not labelled_only):
                n_images += 1
                patients.add(pid)
    return {"images": n_images, "patients": len(patients)}
