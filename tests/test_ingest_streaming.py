"""Ingest streams: a corpus whose decoded images are larger than the object store goes through
without spilling, and every record is accounted for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MiB = 1024 * 1024
STORE_BYTES = 80 * MiB  # Ray's minimum is 75 MiB (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES)
IMAGE_SIZE = 512
N_STUDIES = 300  # ~1 frontal image per study: ~300 x 512^2 x 2 B (float16) = ~150 MiB decoded

# Runs in a fresh interpreter, so the session-scoped cluster of the other tests is untouched:
# a local Ray with a small object store and spilling into a folder we can watch, started
# through the project's own init_ray, then ingest while a thread polls the store.
_CHILD = r"""
import functools, json, os, sys, threading, time
import ray
from ray._private import internal_api

corpus, out, spill_dir, store_bytes, image_size, result_path = sys.argv[1:7]
ray.init = functools.partial(ray.init, object_store_memory=int(store_bytes), _system_config={
    "object_spilling_config": json.dumps({"type": "filesystem", "params": {"directory_path": spill_dir}})})

from medfuse_core.config import IngestConfig
from pipelines import ingest
from pipelines.runtime import init_ray

init_ray(num_cpus=2)
state = internal_api.get_state_from_address(ray.get_runtime_context().gcs_address)
peak = {"used": 0, "capacity": 0, "spilled_bytes": 0, "spilled_objects": 0, "created_bytes": 0,
        "spill_dir_bytes": 0, "samples": 0}
stop = threading.Event()

def poll():
    s = internal_api.get_memory_info_reply(state, timeout_seconds=10).store_stats
    peak["used"] = max(peak["used"], s.object_store_bytes_used)
    peak["capacity"] = max(peak["capacity"], s.object_store_bytes_avail)
    peak["spilled_bytes"] = max(peak["spilled_bytes"], s.spilled_bytes_total)
    peak["spilled_objects"] = max(peak["spilled_objects"], s.spilled_objects_total)
    peak["created_bytes"] = max(peak["created_bytes"], s.cumulative_created_bytes)
    on_disk = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(spill_dir) for f in fs)
    peak["spill_dir_bytes"] = max(peak["spill_dir_bytes"], on_disk)  # spilled files vanish once freed
    peak["samples"] += 1

def loop():
    while not stop.wait(0.25):
        poll()

t = threading.Thread(target=loop, daemon=True)
t.start()
summary = ingest.run("mimic-cxr", corpus, out, IngestConfig(image_size=int(image_size)))
stop.set()
t.join()
poll()
ray.shutdown()
with open(result_path, "w") as f:
    json.dump({"summary": summary, "store": peak}, f)
"""


@pytest.mark.slow
def test_ingest_streams_through_a_small_object_store(tmp_path):
    """Proves ingest never holds the dataset in the object store: with an 80 MiB store and
    ~150 MiB of decoded images, a materialising (or repartitioning) ingest has to spill, and
    one that streams does not. Also proves the streamed run loses nothing: every record is
    ok, quarantined or filtered, and the shards hold every ok image at the stated size.
    (Checked to fail when ``.materialize()`` is added after the ingest ``map_batches``.)"""
    import pyarrow.dataset as pads

    from medfuse_core.data.synth import generate_corpus
    from pipelines.shards import SHARDS_DIR

    corpus, out, spill = tmp_path / "corpus", tmp_path / "data", tmp_path / "spill"
    spill.mkdir()
    generate_corpus(corpus, n_studies=N_STUDIES, seed=3)
    result = tmp_path / "result.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a fresh local cluster
    env.update(MEDFUSE_PROGRESS="0", PYTHONPATH=os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(corpus), str(out), str(spill), str(STORE_BYTES),
                           str(IMAGE_SIZE), str(result)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"ingest subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"

    got = json.loads(result.read_text())
    summary, store = got["summary"], got["store"]
    decoded = summary["n_images"] * IMAGE_SIZE ** 2 * 2
    assert decoded > 1.5 * STORE_BYTES, f"corpus too small to prove anything: {decoded / MiB:.0f} MiB decoded"

    # every record accounted for, and the shards hold every ok image
    assert summary["n_records"] == summary["n_ok"] + summary["n_quarantined"] + summary["n_filtered"]
    assert summary["n_ok"] > 0 and summary["n_quarantined"] == 0
    assert summary["n_images"] == sum(summary["splits"].values())
    shards = pads.dataset(str(out / SHARDS_DIR), format="parquet", partitioning="hive")
    table = shards.to_table(columns=["image_id", "image_size", "split"])
    assert table.num_rows == summary["n_images"]
    assert len(set(table.column("image_id").to_pylist())) == summary["n_images"]
    assert set(table.column("image_size").to_pylist()) == {IMAGE_SIZE}
    sizes = [len(b) for b in shards.to_table(columns=["image"]).column("image").to_pylist()]
    assert sizes == [IMAGE_SIZE ** 2 * 2] * summary["n_images"]

    # streamed: nothing spilled, the store never filled
    facts = (f"store peak {store['used'] / MiB:.1f} MiB of {store['capacity'] / MiB:.0f} MiB, created in store "
             f"{store['created_bytes'] / MiB:.1f} MiB, spilled {store['spilled_bytes'] / MiB:.1f} MiB "
             f"({store['spilled_objects']} objects), spill folder peak {store['spill_dir_bytes'] / MiB:.1f} MiB, "
             f"decoded {decoded / MiB:.0f} MiB, {store['samples']} samples")
    print(facts)
    assert store["samples"] > 0 and store["capacity"] > 0, facts
    assert store["spilled_bytes"] == 0 and store["spilled_objects"] == 0, facts
    assert store["spill_dir_bytes"] == 0 and not any(p.is_file() for p in spill.rglob("*")), facts
    assert store["used"] < store["capacity"], facts
