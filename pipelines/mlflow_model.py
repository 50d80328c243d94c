"""MLflow pyfunc wrapper around a medfuse model bundle (logged as models-from-code).

``predict`` takes a DataFrame with ``image`` (a size x size grid of [0,1] floats, nested
lists or a flat list) and optional ``context`` (clinical-context text; empty or missing means
image-only) and returns one probability column per finding label; a stage-1 (contrastive)
bundle returns each image's embedding in an ``embedding`` column, a report model a draft
(FINDINGS + IMPRESSION) in a ``report`` column.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd


class MedfusePyfunc(mlflow.pyfunc.PythonModel):
    """Serves a medfuse diagnosis bundle."""

    def load_context(self, context):
        from medfuse_core.models.bundle import load_bundle

        self.bundle = load_bundle(context.artifacts["bundle"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        from medfuse_core.evaluation.inference import predict_probabilities

        size = self.bundle.image_size
        images = np.stack([np.asarray(img, dtype=np.float32).reshape(size, size) for img in model_input["image"]])
        if self.bundle.kind == "contrastive":  # a stage-1 model: image embeddings
            from medfuse_core.evaluation.embeddings import embed_images

            return pd.DataFrame({"embedding": list(embed_images(self.bundle, images))})
        if self.bundle.kind == "report":
            from medfuse_core.evaluation.report_inference import decoding_settings, draft_images

            texts = [c if isinstance(c, str) else "" for c in model_input["context"]] if "context" in model_input else None
            drafts = draft_images(self.bundle, list(images), texts, decoding_settings(self.bundle))
            return pd.DataFrame({"report": drafts})
        texts = list(model_input["context"]) if "context" in model_input else [""] * len(images)
        probs = predict_probabilities(self.bundle, images, texts)
        return pd.DataFrame(probs, columns=self.bundle.label_names)


mlflow.models.set_model(MedfusePyfunc())
