"""Images from a logged or registered generator (`python -m pipeline sample`, `compare`).

Noise is drawn from a seeded torch generator on the CPU, so a seed names the same z on every
machine; models with different nz share its first columns (see `latent_noise`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.core.progress import progress
from pipeline.data.grids import save_grid
from pipeline.models.dcgan import latent_noise

if TYPE_CHECKING:  # MLflow is imported where a model is loaded
    from mlflow.pyfunc import PyFuncModel

log = logging.getLogger(__name__)

SAMPLE_BATCH_SIZE = 256
FORMATS = ("png", "npy")


def load_generator_model(model_uri: str) -> PyFuncModel:
    """Load a generator logged by `pipeline.registry` (models:/NAME@ALIAS, models:/NAME/V, ...)."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"cannot load {model_uri}: {err.message.splitlines()[0]}") from err
    latent_nz(model, model_uri)  # fail now, not after loading every model of a comparison
    return model


def latent_nz(model: PyFuncModel, model_uri: str = "the model") -> int:
    """nz from the model's signature (input `z`: float32 [-1, nz])."""
    schema = model.metadata.get_input_schema()
    inputs = schema.inputs if schema is not None else []
    if len(inputs) != 1 or getattr(inputs[0], "name", None) != "z" or len(inputs[0].shape) != 2:
        raise UserError(f"{model_uri} is not a generator: its input is not z [-1, nz]")
    return int(inputs[0].shape[1])


def generate(model: PyFuncModel, z: np.ndarray) -> np.ndarray:
    """Images (N, C, H, W) float32 in [-1, 1] for the noise `z` (N, nz), in batches."""
    chunks = [z[start : start + SAMPLE_BATCH_SIZE] for start in range(0, len(z), SAMPLE_BATCH_SIZE)]
    images = [
        np.asarray(model.predict({"z": chunk}), dtype=np.float32)
        for chunk in progress(chunks, desc="generating", unit="batch", disable=len(chunks) < 2)
    ]
    return np.concatenate(images)


def sample_to_file(model_uri: str, count: int, seed: int, out: Path, fmt: str = "png") -> Path:
    """Generate `count` images from `model_uri` with noise `seed`; write a grid PNG or an .npy
    array (N, C, H, W) float32 in [-1, 1] to `out`."""
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if count < 1:
        raise UserError(f"--n must be at least 1, got {count}")
    model = load_generator_model(model_uri)
    images = generate(model, latent_noise(count, latent_nz(model, model_uri), seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        with out.open("wb") as handle:  # np.save(path) would append .npy to other names
            np.save(handle, images, allow_pickle=False)
    else:
        save_grid(torch.from_numpy(images), out)
    log.info("wrote %d images from %s to %s", count, model_uri, out)
    return out
