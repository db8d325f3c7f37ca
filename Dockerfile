# syntax=docker/dockerfile:1
# Serving images only: onnxruntime, no torch. Targets: `cpu` (default, slim) and `gpu` (CUDA).

FROM python:3.11-slim AS cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN useradd --create-home --uid 10001 endofuse
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip install '.[cpu]'
COPY models ./models
USER endofuse
EXPOSE 8000
ENV ENDOFUSE_HOST=0.0.0.0 ENDOFUSE_MODELS_DIR=/app/models
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s \
  CMD python -c "import sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
CMD ["endofuse", "serve"]

FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 AS gpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-pip \
    && rm -rf /var/lib/apt/lists/* && useradd --create-home --uid 10001 endofuse
WORKDIR /app
COPY pyproject.toml README.md ./
COPY service ./service
RUN pip3 install '.[gpu]'
COPY models ./models
USER endofuse
EXPOSE 8000
ENV ENDOFUSE_HOST=0.0.0.0 ENDOFUSE_MODELS_DIR=/app/models ENDOFUSE_PROVIDERS=auto
HEALTHCHECK --interval=10s --timeout=3s --start-period=90s \
  CMD python3 -c "import sys,urllib.request as u; sys.exit(u.urlopen('http://127.0.0.1:8000/readyz', timeout=2).status != 200)"
CMD ["endofuse", "serve"]
