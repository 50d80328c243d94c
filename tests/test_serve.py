"""The Ray Serve deployment on the local cluster: batched requests over HTTP answer what
``medfuse predict``'s code computes for the same files; a bad file answers a reason code."""

from __future__ import annotations

import base64
import json
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from medfuse_core.data.labels import CHEXPERT_LABELS
from tests.test_predict import bundle_dir  # noqa: F401  (the calibrated diagnosis bundle fixture)

# starts Ray Serve's proxy and a replica (about a minute): `python -m pytest -m heavy`
pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def test_serve_deployment_batches_and_matches_predict(ray_local, bundle_dir, tiny_corpus):  # noqa: F811
    from ray import serve

    from medfuse_core.data.dicom import decode_dicom
    from medfuse_core.data.records import as_stored
    from medfuse_core.evaluation.inference import predict_frame
    from medfuse_core.models.bundle import load_bundle
    from pipelines.serve import build_app

    files = sorted(tiny_corpus.rglob("*.dcm"))[:4]
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    serve.run(build_app({"model": str(bundle_dir), "max_batch_size": 4}), name="medfuse", route_prefix="/")
    try:
        def ask(body):
            req = urllib.request.Request("http://127.0.0.1:8123/", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
            return json.loads(urllib.request.urlopen(req, timeout=120).read())

        bodies = [{"record_id": f"r{k}", "dicom": base64.b64encode(f.read_bytes()).decode(),
                   "context": "cough" if k % 2 else ""} for k, f in enumerate(files)]
        bodies.append({"record_id": "bad", "dicom": base64.b64encode(b"not dicom").decode()})
        with ThreadPoolExecutor(len(bodies)) as pool:  # arrive together: scored as batches
            answers = list(pool.map(ask, bodies))
    finally:
        serve.delete("medfuse")
        serve.shutdown()
    bundle = load_bundle(bundle_dir)
    images = [as_stored(decode_dicom(str(f), bundle.image_size).pixels) for f in files]  # the shards' precision
    direct = predict_frame(bundle, images, [b["context"] for b in bodies[:-1]])
    for k, answer in enumerate(answers[:-1]):
        assert answer["record_id"] == f"r{k}" and answer["error"] == ""
        assert answer["context_used"] == int(direct["context_used"][k])
        for j, name in enumerate(CHEXPERT_LABELS):
            assert abs(answer[f"prob:{name}"] - float(direct["prob"][k, j])) < 1e-5
            assert answer[f"pred:{name}"] == int(direct["pred"][k, j])
    assert answers[-1]["error"] and answers[-1][f"prob:{CHEXPERT_LABELS[0]}"] is None
