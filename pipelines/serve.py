"""A Ray Serve deployment of a registered diagnosis model, batched, for GPU clusters.

``serve run pipelines.serve:build_app model=models:/medfuse-cxr-diagnosis@champion`` (or a
workdir or bundle folder; ``num_replicas``, ``max_batch_size``, ``num_gpus`` optional) serves
``POST /`` with JSON ``{"dicom": "<base64 of the file>", "context": "<optional text>"}`` and
answers ``{"record_id": "", "context_used": 0|1, "prob:<label>": p, ..., "pred:<label>": 0|1, ...,
"error": ""}``: the columns of ``medfuse predict`` and of the MLflow pyfunc, computed by the same
code (decoding, calibration, operating points from the bundle). Requests that arrive together
are scored as one batch (``serve.batch``); a file that does not decode answers its reason code
in ``error`` with null probabilities.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

from ray import serve


def _decode(item: dict):
    from medfuse_core.data.dicom import DicomDecodeError, decode_dicom
    from medfuse_core.data.records import as_stored

    try:
        return as_stored(decode_dicom(base64.b64decode(item.get("dicom") or b""), item["_size"]).pixels), ""
    except DicomDecodeError as err:
        return None, err.reason
    except (TypeError, ValueError):
        return None, "not_dicom_bytes"


@serve.deployment(ray_actor_options={"num_cpus": 1})
class MedfuseDiagnosis:
    """Loads the bundle once per replica; scores batched requests."""

    def __init__(self, model: str, threads: int = 1, max_batch_size: int = 16):
        import torch

        from medfuse_core.models.bundle import load_bundle
        from pipelines.model_refs import resolve_model

        torch.set_num_threads(max(1, int(threads)))
        self._tmp = tempfile.TemporaryDirectory(prefix="medfuse-serve-")
        bundle_dir, _ = resolve_model(model, Path(self._tmp.name))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = load_bundle(bundle_dir, device=device)
        if self.bundle.kind != "diagnosis":
            raise ValueError(f"model: a {self.bundle.kind} model; this deployment serves diagnosis models")
        self.score.set_max_batch_size(int(max_batch_size))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.02)
    async def score(self, items: list[dict]) -> list[dict]:
        """One answer per request, the batch scored in one forward per mode."""
        from medfuse_core.evaluation.inference import predict_frame

        decoded = [_decode({**item, "_size": self.bundle.image_size}) for item in items]
        ok = [k for k, (img, _) in enumerate(decoded) if img is not None]
        labels = self.bundle.label_names
        res = predict_frame(self.bundle, [decoded[k][0] for k in ok],
                            [str(items[k].get("context") or "") for k in ok]) if ok else None
        out = []
        for k, (img, error) in enumerate(decoded):
            row = {"record_id": str(items[k].get("record_id", "")), "context_used": 0, "error": error}
            if img is None:
                row.update({f"prob:{n}": None for n in labels} | {f"pred:{n}": None for n in labels})
            else:
                i = ok.index(k)
                row["context_used"] = int(res["context_used"][i])
                row.update({f"prob:{n}": float(res["prob"][i, j]) for j, n in enumerate(labels)})
                row.update({f"pred:{n}": int(res["pred"][i, j]) for j, n in enumerate(labels)})
            out.append(row)
        return out

    async def __call__(self, request) -> dict:
        return await self.score(await request.json())


def build_app(args: dict):
    """The Serve application for ``serve run pipelines.serve:build_app model=...``."""
    options = {"num_replicas": int(args.get("num_replicas", 1))}
    if args.get("num_gpus"):
        options["ray_actor_options"] = {"num_cpus": 1, "num_gpus": float(args["num_gpus"])}
    return MedfuseDiagnosis.options(**options).bind(str(args["model"]), int(args.get("threads", 1)),
                                                    int(args.get("max_batch_size", 16)))
