"""Checkpoint storage: where Ray Train writes checkpoints, and which of them are complete.

Storage is a local path (one machine), a shared filesystem path, or an object-store URI
(``s3://``, ``gs://``, ``abfs://``, ``hdfs://``) read through pyarrow filesystems, the same
way Ray Train reads it. A checkpoint folder holds::

    deepspeed/             every rank's DeepSpeed shards (ZeRO-3: each rank its own)
    bundle/                rank 0's self-contained model bundle
    train_state.json       epoch, step, score, world size
    ranks/rank-<r>.json    written by each rank last: every file it wrote, with its size

A checkpoint cut short by a crash lacks a manifest or a listed file and is never resumed from.
"""

from __future__ import annotations

import json
import os
import posixpath
from pathlib import Path

BUNDLE_DIR = "bundle"
TRAIN_STATE = "train_state.json"
RANKS_DIR = "ranks"  # one manifest per rank, written after its part of the checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint that should be resumed from is missing or incomplete."""


def is_uri(location: str | Path) -> bool:
    """True for ``scheme://...`` locations (object stores, HDFS), False for filesystem paths."""
    return "://" in str(location) and not str(location).startswith("file://")


def filesystem(location: str | Path):
    """``(pyarrow filesystem, path inside it)`` for a local path or a storage URI."""
    import pyarrow.fs

    location = str(location)
    if not is_uri(location):
        local = location[len("file://"):] if location.startswith("file://") else location
        return pyarrow.fs.LocalFileSystem(), str(Path(local).expanduser().resolve())
    return pyarrow.fs.FileSystem.from_uri(location)


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


def _read_json(fs, path: str):
    with fs.open_input_stream(path) as fh:
        return json.loads(fh.read().decode("utf-8"))


def missing_parts(fs, folder: str, state: dict) -> list[str]:
    """What a checkpoint folder lacks: rank manifests, listed files, or files of another size."""
    import pyarrow.fs

    missing = []
    if fs.get_file_info(posixpath.join(folder, BUNDLE_DIR, "medfuse_model.json")).type != pyarrow.fs.FileType.File:
        missing.append(f"{BUNDLE_DIR}/medfuse_model.json")
    for rank in range(int(state.get("world_size", 1))):
        rel = f"{RANKS_DIR}/rank-{rank}.json"
        try:
            files = _read_json(fs, posixpath.join(folder, rel))["files"]
        except (OSError, ValueError, KeyError):
            missing.append(rel)
            continue
        infos = fs.get_file_info([posixpath.join(folder, name) for name in files]) if files else []
        for (name, size), info in zip(files.items(), infos):
            if info.type != pyarrow.fs.FileType.File or info.size != size:
                missing.append(name)
    return missing


def check_complete(folder: str | Path, state: dict) -> None:
    """Raise :class:`CheckpointError` naming what a checkpoint being resumed from lacks."""
    fs, path = filesystem(folder)
    missing = missing_parts(fs, path, state)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"the checkpoint to resume from ({Path(str(folder)).name}, epoch {state.get('epoch')}) "
                              f"is incomplete: {shown} missing or cut short. Restore the files, or start again "
                              "in a new --workdir")


def find_checkpoints(storage: str | Path, run_name: str | None = None) -> list[tuple[dict, str]]:
    """Every complete checkpoint under ``storage`` (one run's, or every run's) with its train
    state, oldest step first; the paths are inside ``storage``'s filesystem (local: plain paths)."""
    import pyarrow.fs

    fs, root = filesystem(storage)
    local = isinstance(fs, pyarrow.fs.LocalFileSystem)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    runs = [posixpath.join(root, run_name)] if run_name else [
        info.path for info in fs.get_file_info(pyarrow.fs.FileSelector(root)) if info.type == pyarrow.fs.FileType.Directory]
    found = []
    for run in runs:
        if fs.get_file_info(run).type != pyarrow.fs.FileType.Directory:
            continue
        for info in fs.get_file_info(pyarrow.fs.FileSelector(run)):
            if info.type != pyarrow.fs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
                continue
            try:
                state = _read_json(fs, posixpath.join(info.path, TRAIN_STATE))
            except (OSError, ValueError):
                continue
            if not missing_parts(fs, info.path, state):
                found.append((state, Path(info.path) if local else info.path))
    return sorted(found, key=lambda item: item[0]["global_step"])


def write_probe(storage: str | Path, name: str) -> str:
    """Write a small marker file under ``storage`` (for checking other nodes see the same storage)."""
    fs, root = filesystem(storage)
    fs.create_dir(root, recursive=True)
    path = posixpath.join(root, name)
    with fs.open_output_stream(path) as fh:
        fh.write(b"medfuse storage probe\n")
    return path


def storage_arguments(storage: str | Path):
    """``(storage_filesystem, storage_path)`` for ``ray.train.RunConfig``: a local path as it is,
    a URI as its pyarrow filesystem and the path inside it."""
    if not is_uri(storage):
        return None, filesystem(storage)[1]
    return filesystem(storage)


def ray_checkpoint(path: str | Path, storage: str | Path):
    """A ``ray.train.Checkpoint`` for a checkpoint folder found by :func:`find_checkpoints`."""
    import ray.train

    fs, _ = filesystem(storage)
    return ray.train.Checkpoint(str(path), filesystem=fs)


def train_state(checkpoint) -> dict:
    """The ``train_state.json`` of a ``ray.train.Checkpoint`` (read through its filesystem)."""
    return _read_json(checkpoint.filesystem, posixpath.join(checkpoint.path, TRAIN_STATE))
