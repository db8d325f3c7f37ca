# syntax=docker/dockerfile:1
# Serving images only: ONNX Runtime, never torch. Targets:
#   cpu  Python base + onnxruntime                 (API replicas; CPU workers)
#   gpu  NVIDIA CUDA runtime base, onnxruntime-gpu (GPU workers)
# Both run `endofuse serve` by default; compose runs `endofuse worker` from the same image.
# BASE: any Debian-like image with python3 (3.11) and its venv module. The default is the
# public python image; service/deploy/build-images.sh passes a base made by mmdebstrap from
# Debian packages, for hosts that reach no container registry.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
# Wheels for the serving dependencies only (no 'train' extra), from the project's metadata
# alone: a change to the code then rebuilds the project's own wheel, not every dependency's.
RUN mkdir service && /opt/venv/bin/pip wheel --wheel-dir /deps '.[cpu]' \
    && rm /deps/endofuse-*.whl
COPY service ./service
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels .

# The gpu wheels only where that target is built (BuildKit skips this stage otherwise).
FROM build AS build-gpu
RUN /opt/venv/bin/pip wheel --wheel-dir /wheels-gpu '.[gpu]'

FROM ${BASE} AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/venv/bin:$PATH
RUN useradd --create-home --uid 10001 endofuse && python3 -m venv /opt/venv
COPY --from=build /deps /deps
RUN pip install --no-index --find-links /deps /deps/*.whl && rm -rf /deps
COPY --from=build /wheels /wheels
RUN pip install --no-index --no-deps /wheels/*.whl && rm -rf /wheels && pip check \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
WORKDIR /app
COPY models ./models
USER endofuse
EXPOSE 8000 8001
ENV ENDOFUSE_HOST=0.0.0.0 ENDOFUSE_MODELS_DIR=/app/models \
    ENDOFUSE_HEALTH_URL=http://127.0.0.1:8000/readyz
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import os,sys,urllib.request as u; sys.exit(u.urlopen(os.environ['ENDOFUSE_HEALTH_URL'], timeout=2).status != 200)"
CMD ["endofuse", "serve"]

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3-pip \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 endofuse
COPY --from=build-gpu /wheels-gpu /wheels
RUN python3.11 -m pip install --no-index --find-links /wheels endofuse onnxruntime-gpu \
    && rm -rf /wheels
WORKDIR /app
COPY models ./models
USER endofuse
EXPOSE 8000 8001
ENV ENDOFUSE_HOST=0.0.0.0 ENDOFUSE_MODELS_DIR=/app/models ENDOFUSE_PROVIDERS=auto \
    ENDOFUSE_HEALTH_URL=http://127.0.0.1:8001/readyz
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s \
  CMD python3.11 -c "import os,sys,urllib.request as u; sys.exit(u.urlopen(os.environ['ENDOFUSE_HEALTH_URL'], timeout=2).status != 200)"
CMD ["endofuse", "worker"]
