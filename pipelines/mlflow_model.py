"""MLflow pyfunc wrapper around a medfuse model bundle (logged as models-from-code).

A diagnosis model takes a DataFrame with ``dicom`` (the file's bytes; base64 inside JSON
``dataframe_split`` over HTTP) and an optional ``context`` (clinical-context text; empty or
missing means image-only) and answers, per row, ``record_id`` (the row's index), ``context_used``,
``prob:<label>`` (calibrated) and ``pred:<label>`` (0/1 at the validation operating point), the
columns of ``medfuse predict``, plus ``error``: a reason code for a file that does not decode
(its probabilities are NaN), never an exception. Decoding, the temperatures and the thresholds
are the ones in the bundle. A stage-1 (contrastive) bundle returns each
image's embedding (``embedding``), a report model a draft (FINDINGS + IMPRESSION, ``report``).
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


def _images(bundle, frame: pd.DataFrame) -> tuple[list, list[str]]:
    """Decoded [0, 1] images per row (None where decoding failed) and each row's error code."""
    from medfuse_core.data.dicom import DicomDecodeError, decode_dicom
    from medfuse_core.data.records import as_stored

    size = bundle.image_size
    images, errors = [], []
    for blob in frame["dicom"]:
        try:
            if isinstance(blob, str):  # base64 text from a client that did not declare the column binary
                import base64

                blob = base64.b64decode(blob)
            images.append(as_stored(decode_dicom(bytes(blob), size).pixels))
            errors.append("")
        except DicomDecodeError as err:
            images.append(None)
            errors.append(err.reason)
        except (TypeError, ValueError):
            images.append(None)
            errors.append("not_dicom_bytes")
    return images, errors


class MedfusePyfunc(mlflow.pyfunc.PythonModel):
    """Serves a medfuse bundle (diagnosis, stage-1 or report model)."""

    def load_context(self, context):
        from medfuse_core.models.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images, errors = _images(self.bundle, model_input)
        ok = [k for k, img in enumerate(images) if img is not None]
        texts = ([c if isinstance(c, str) else "" for c in model_input["context"]]
                 if "context" in model_input else [""] * len(images))
        if self.bundle.kind == "contrastive":  # a stage-1 model: image embeddings
            from medfuse_core.evaluation.embeddings import embed_images

            emb = embed_images(self.bundle, np.stack([images[k] for k in ok])) if ok else []
            out = [None] * len(images)
            for k, e in zip(ok, emb):
                out[k] = e
            return pd.DataFrame({"embedding": out, "error": errors})
        if self.bundle.kind == "report":
            from medfuse_core.evaluation.report_inference import decoding_settings, draft_images

            drafts = draft_images(self.bundle, [images[k] for k in ok], [texts[k] for k in ok],
                                  decoding_settings(self.bundle)) if ok else []
            out = [""] * len(images)
            for k, d in zip(ok, drafts):
                out[k] = d
            return pd.DataFrame({"report": out, "error": errors})
        from medfuse_core.evaluation.inference import predict_frame

        labels = self.bundle.label_names
        prob = np.full((len(images), len(labels)), np.nan, np.float32)
        pred = np.zeros((len(images), len(labels)), np.int64)
        used = np.zeros(len(images), np.int64)
        if ok:
            res = predict_frame(self.bundle, [images[k] for k in ok], [texts[k] for k in ok])
            prob[ok], pred[ok], used[ok] = res["prob"], res["pred"], res["context_used"]
        frame = {"record_id": [str(i) for i in model_input.index], "context_used": used}
        frame.update({f"prob:{n}": prob[:, j].astype(np.float64) for j, n in enumerate(labels)})
        frame.update({f"pred:{n}": pred[:, j] for j, n in enumerate(labels)})
        frame["error"] = errors
        return pd.DataFrame(frame)


mlflow.models.set_model(MedfusePyfunc())
