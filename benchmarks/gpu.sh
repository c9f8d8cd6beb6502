#!/usr/bin/env bash
# GPU benchmark for an NVIDIA machine that has PyTorch and numpy but none of this project's
# other packages. On a machine with PyPI access, in the repo root, build the wheelhouse:
#   make gpu-wheels          # [GPU_PYTHON=3.12]: the GPU machine's Python version
# (pillow, pyyaml, fsspec, tqdm, webdataset, braceexpand and, for --tests, pytest and its
# dependencies, at this repository's pins, into .whl/). Copy the repo with .whl/ to the GPU
# machine and run, from the repo root:
#   bash benchmarks/gpu.sh [--steps 200 --repeats 3 --batch-size 128 --output gpu.json]
#       [--cache-images 200000]      # also time the decoded-cache build for 200,000 images
#   bash benchmarks/gpu.sh --tests [...]   # first tests/test_gpu.py (captured step, resume)
# The wheels are installed with `pip --target` into a private directory put on PYTHONPATH:
# nothing in the machine's Python is changed. No Ray, MLflow, DVC or torchmetrics is needed;
# the tests need no webdataset either (tests/test_architecture.py checks the imports).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${GPU_BENCH_SITE:-/tmp/dcgan_bench_site}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PYTHON" - <<'PY'
import importlib, sys
missing = [m for m in ("torch", "numpy", "PIL", "yaml", "fsspec", "tqdm", "webdataset",
                       "braceexpand")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing Python packages {missing}: `make gpu-wheels` builds .whl/")
import torch
if not torch.cuda.is_available():
    sys.exit("gpu.sh: no CUDA GPU visible to torch")
print(f"gpu.sh: torch {torch.__version__}, {torch.cuda.get_device_name(0)}", flush=True)
PY
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
if [[ "${1:-}" == "--tests" ]]; then
    shift
    "$PYTHON" -m pytest tests/test_gpu.py -ra -p no:cacheprovider
fi
exec "$PYTHON" -m benchmarks.gpu "$@"
