# The image every Ray cluster node runs (head and workers): the pipeline library, its stages and
# the pinned dependencies. CPU by default; for NVIDIA GPUs build with
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t dcgan-pipeline:gpu .
# (PyTorch's CUDA wheels bundle the CUDA libraries; the node only needs the NVIDIA driver.)
# A different base (e.g. an internal mirror of python:3.11) via --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=python:3.11.7-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    RAY_USAGE_STATS_ENABLED=0

# The app directory belongs to that user: the stages write data/, models/ and reports/ into it.
RUN useradd --create-home --uid 1000 --shell /bin/bash ray \
 && install -d -o ray -g ray /home/ray/app/data /home/ray/app/models /home/ray/app/reports \
 && chown ray:ray /home/ray/app
WORKDIR /home/ray/app

COPY requirements.txt constraints.txt ./
# torch first, from the chosen index (CPU or CUDA build); the rest pinned by the lock file.
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}" \
 && grep -v '^torch==' constraints.txt > /tmp/constraints-no-torch.txt \
 && grep -v '^torch==' requirements.txt > /tmp/requirements-no-torch.txt \
 && pip install --no-cache-dir -r /tmp/requirements-no-torch.txt -c /tmp/constraints-no-torch.txt

COPY --chown=ray:ray pyproject.toml params.yaml dvc.yaml README.md ./
COPY --chown=ray:ray pipeline ./pipeline
COPY --chown=ray:ray stages ./stages
RUN pip install --no-cache-dir --no-deps --no-build-isolation -e .

USER 1000
# Ray's ports stay inside the cluster network; the dashboard is reached by port-forwarding.
CMD ["ray", "start", "--head", "--block", "--dashboard-host=127.0.0.1"]
