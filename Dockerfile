# syntax=docker/dockerfile:1
# aat-serve: `aat serve` on a CUDA runtime base (default) or a CPU-only base.
#
#   GPU:  docker build -t aat-serve .
#   CPU:  docker build -t aat-serve:cpu --build-arg BASE_IMAGE=ubuntu:24.04 \
#             --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#   run:  docker run --gpus all -p 8000:8000 -v "$PWD/models:/models:ro" -v aat-bundles:/bundles \
#             -e AAT_CHECKPOINT=/models/audioset_10_10_0.4593.pth -e AAT_ADMIN_TOKEN aat-serve
#
# The image is configured only by AAT_* environment variables (docs/deploy.md lists them all).
# Both stages start from the same base so the virtual environment's interpreter path
# (/usr/bin/python3) exists unchanged in the final stage.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# ---- python: the distribution's Python and the audio codec library, nothing else ----------------
FROM ${BASE_IMAGE} AS python
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libsndfile1 \
    && rm -rf /var/lib/apt/lists/*

# ---- build: a virtual environment with torch and aat-serve; compilers and pip stay here --------
FROM python AS build
ARG TORCH_INDEX_URL
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, from the index matching the base (CUDA wheels or CPU wheels); its layer stays
# cached while the project's code changes.
RUN pip install --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchaudio==2.11.0
WORKDIR /src
COPY pyproject.toml README.md ./
COPY adapters ./adapters
COPY training ./training
COPY service ./service
COPY aat_serve ./aat_serve
RUN pip install . \
    && pip uninstall -y pip

# ---- runtime: the base, the environment, a non-root user ----------------------------------------
FROM python AS runtime
ARG UID=10001
RUN groupadd --system --gid "${UID}" aat \
    && useradd --system --uid "${UID}" --gid aat --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin aat \
    && mkdir -p /models /bundles \
    && chown aat:aat /bundles
COPY --from=build /opt/venv /opt/venv
# Caches go to /tmp so the root filesystem can be mounted read-only (the Kubernetes manifests do).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    XDG_CACHE_HOME=/tmp/.cache \
    TRITON_CACHE_DIR=/tmp/.triton \
    MPLCONFIGDIR=/tmp/.matplotlib \
    AAT_HOST=0.0.0.0 \
    AAT_PORT=8000 \
    AAT_BUNDLE_DIR=/bundles
# /models: the backbone checkpoint (mount read-only, point AAT_CHECKPOINT at it);
# /bundles: the bundle store, shared by every replica.
VOLUME ["/models", "/bundles"]
USER 10001:10001
EXPOSE 8000
# Liveness only (the process answers); readiness is /readyz, used by compose and Kubernetes.
# Python rather than curl: the image has no curl.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('AAT_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["aat", "serve"]
