"""Packaging the generator for the registry: an MLflow 3 *models from code* pyfunc.

The model's code is the file `pipeline/registry/generator_pyfunc.py` (logged as source, never
cloudpickled), plus two plain artifacts, `spec` (JSON: nz, ngf, image_size, channels) and
`weights` (the plain Generator state_dict, read with `torch.load(weights_only=True)`). The
modules it imports (the `pipeline/models` package) travel with it as `code_paths`. Loading it
therefore runs only this project's source and never unpickles an object from the artifact
store. It is logged into the *training* MLflow run (so run and version link both ways) and
carries a signature:

    inputs:  z       float32 [-1, nz]
    outputs: images  float32 [-1, C, H, W], in [-1, 1]

and an input example. Load it with `mlflow.pyfunc.load_model("models:/NAME@ALIAS")` and call
`.predict({"z": z})`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib.metadata import version as package_version
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import ModelSignature
from mlflow.types import Schema, TensorSpec

from pipeline.models.dcgan import GeneratorSpec
from pipeline.registry.tags import TAG_WEIGHTS_SHA

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # the `pipeline` folder
MODEL_CODE = Path(__file__).with_name("generator_pyfunc.py")
# The modules the model code imports, relative to `pipeline/`: shipped with the model so that
# it loads outside this repository. The whole `models` subpackage, not just dcgan.py: loading
# the model puts this copy first on sys.path, so in that process (and in processes it spawns)
# `pipeline.models` is the copy, and a partial one would hide `pipeline.models.classifier`
# from the rest of the library.
MODEL_CODE_DEPS = ("__init__.py", *sorted(
    str(path.relative_to(PACKAGE_ROOT)) for path in (PACKAGE_ROOT / "models").glob("*.py")
))
MODEL_ARTIFACT_NAME = "generator"
INPUT_EXAMPLE_ROWS = 2


def generator_signature(spec: GeneratorSpec) -> ModelSignature:
    """z float32 [-1, nz] -> images float32 [-1, C, H, W]."""
    image_shape = (-1, spec.channels, spec.image_size, spec.image_size)
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec.nz), "z")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), image_shape, "images")]),
    )


def find_version_by_weights(
    client: MlflowClient, name: str, weights_sha256: str
) -> ModelVersion | None:
    """The version of `name` registered for these weights, if any (oldest first)."""
    versions = client.search_model_versions(
        f"name = '{name}' and tags.{TAG_WEIGHTS_SHA} = '{weights_sha256}'"
    )
    return min(versions, key=lambda v: int(v.version), default=None)


def _code_package(directory: Path) -> Path:
    """Copy the modules the model code imports into `directory/pipeline` (its code_paths)."""
    package = directory / "pipeline"
    for module in MODEL_CODE_DEPS:
        target = package / module
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_ROOT / module, target)
    return package


def log_generator_model(
    spec: GeneratorSpec, weights_path: Path, run_id: str
) -> mlflow.models.model.ModelInfo:
    """Log the generator (format: module docstring) into the existing run `run_id`."""
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec.to_dict(), sort_keys=True))
        example = {"z": np.zeros((INPUT_EXAMPLE_ROWS, spec.nz), dtype=np.float32)}
        with mlflow.start_run(run_id=run_id):
            return mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(MODEL_CODE),
                artifacts={"spec": str(spec_path), "weights": str(weights_path)},
                code_paths=[str(_code_package(Path(tmp)))],
                signature=generator_signature(spec),
                input_example=example,
                # Explicit requirements: inferring them would import the model in a subprocess.
                pip_requirements=[
                    f"mlflow=={mlflow.__version__}",
                    f"torch=={package_version('torch').split('+')[0]}",
                    f"numpy=={np.__version__}",
                ],
            )
