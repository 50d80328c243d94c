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
