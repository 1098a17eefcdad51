# syntax=docker/dockerfile:1
#
# robustdiff image: one image runs `robustdiff serve` (default command) or `robustdiff worker`.
#
#   CPU:  docker build -t robustdiff:cpu .
#   GPU:  docker build --build-arg VARIANT=cuda -t robustdiff:cuda .
#
# The committed checkpoints (models/weights) are installed with the package, so the image runs
# as is. To serve other weights without rebuilding, mount them read-only and point
# ROBUSTDIFF_MODELS at them:
#   docker run -v /srv/weights:/weights:ro \
#     -e ROBUSTDIFF_MODELS=/weights/a.safetensors,/weights/b.safetensors robustdiff:cpu

ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.14

FROM ${UV_IMAGE} AS uv

# Ubuntu (the only CUDA runtime base) ships no Python 3.11, so the CUDA image gets a relocatable
# python-build-standalone 3.11, laid out under /usr/local exactly like python:3.11-slim.
FROM debian:bookworm-slim AS standalone-python
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/uv-python
RUN uv python install 3.11 \
    && mkdir /python \
    && cp -a "$(dirname "$(dirname "$(uv python find 3.11)")")"/. /python/

FROM python:3.11-slim AS python-cpu

FROM ${CUDA_IMAGE} AS python-cuda
COPY --from=standalone-python /python/ /usr/local/

# Both builder and runtime start from the same base so the venv's interpreter path is valid.
# (DL3006: python-${VARIANT} is a stage above, not an untagged image.)
# hadolint ignore=DL3006
FROM python-${VARIANT} AS builder
ARG VARIANT
ARG TORCH_VERSION=2.13.0
ARG TORCH_CUDA=cu130
# torch's wheel index; the variant's folder (cpu or $TORCH_CUDA) is appended. Empty: pip's own
# configuration picks the build (a mirror, or local wheels mounted into an offline build).
ARG TORCH_INDEX=https://download.pytorch.org/whl
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from its own index only (a CPU or CUDA build); the project's "torch==2.13.0" pin is
# then already satisfied and pip never pulls the multi-GB default CUDA wheel from PyPI.
RUN case "$VARIANT" in \
      cpu) index=cpu ;; \
      cuda) index="$TORCH_CUDA" ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac \
    && pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX:+--index-url "$TORCH_INDEX/$index"}
WORKDIR /src
# README.md is only the package's long description: left out so the build never depends on it.
COPY pyproject.toml ./
COPY kernels/ kernels/
COPY models/ models/
COPY service/ service/
# Non-editable install: the weights travel as package data inside the venv.
# -P keeps /src off sys.path, so the import check sees the installed package.
RUN pip install . && python -P -c "import kernels, models, service.cli"

# hadolint ignore=DL3006
FROM python-${VARIANT} AS runtime
LABEL org.opencontainers.image.title="robustdiff" \
      org.opencontainers.image.description="Adversarially trained diffusion models: sampling and purification over HTTP" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 robustdiff \
    && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/robustdiff \
       --shell /usr/sbin/nologin robustdiff
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /home/robustdiff
USER 10001:10001
EXPOSE 8000 9400
# Probes the API; the worker service overrides it (compose) to probe its metrics port instead.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["robustdiff"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
