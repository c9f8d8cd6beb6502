"""The registered generator as an MLflow "models from code" pyfunc (see `pipeline.registry`).

MLflow executes this file (it is logged as the model's code, not pickled) when the model is
loaded. `load_context` rebuilds the generator from two plain artifacts: `spec` (JSON) and
`weights` (a state_dict read with `torch.load(weights_only=True)`), so loading a registered
model never unpickles an arbitrary object.

Input `z`: float32 (N, nz). Output: float32 images (N, C, H, W) in [-1, 1].
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from pipeline.models.dcgan import GeneratorSpec, load_generator

# Bounds memory for large requests; the images do not depend on it (eval-mode BatchNorm).
PREDICT_BATCH_SIZE = 256


def _latent_array(model_input: Any) -> np.ndarray:
    """The z matrix from what pyfunc passes: {"z": array}, an array, or a DataFrame."""
    if isinstance(model_input, dict):
        model_input = model_input["z"]
    if isinstance(model_input, pd.DataFrame):
        model_input = model_input.to_numpy()
    return np.asarray(model_input, dtype=np.float32)


class GeneratorModel(PythonModel):
    """pyfunc wrapper: z -> images, with weights loaded safely from the model's artifacts."""

    def load_context(self, context: Any) -> None:
        spec = GeneratorSpec.from_dict(json.loads(Path(context.artifacts["spec"]).read_text()))
        # torch.load(weights_only=True) inside: a state_dict of tensors, nothing unpickled.
        self.generator = load_generator(context.artifacts["weights"], spec)

    # No type hints here: MLflow would read them as a (list-based) input schema.
    def predict(self, context, model_input, params=None):
        z = torch.from_numpy(_latent_array(model_input))
        with torch.inference_mode():
            images = [self.generator(chunk) for chunk in z.split(PREDICT_BATCH_SIZE)]
        return torch.cat(images).numpy()


mlflow.models.set_model(GeneratorModel())
