# amdet-gate in a container. Two variants from one file, chosen with a build argument:
#
#   docker build -t amdet-gate:cpu .                              # slim CPU image (default)
#   docker build -t amdet-gate:cuda --build-arg VARIANT=cuda .    # CUDA runtime image, for GPU hosts
#
#   docker run --rm -v "$PWD:/work" amdet-gate:cpu scan models/text_encoder --out amdet-out
#   docker run --rm --gpus all -v "$PWD:/work" amdet-gate:cuda scan models/text_encoder --device cuda
#
# Base images are pinned by digest (a tag can be moved, a digest cannot). To update one, read the new tag's
# digest (`docker buildx imagetools inspect IMAGE:TAG`) and replace both tag and digest below. No `# syntax=`
# line on purpose: it would pull an unpinned frontend image; nothing here needs more than the built-in one.
#
# - cpu:  python:3.11-slim-bookworm, torch from the PyTorch CPU wheel index (no CUDA libraries: small).
# - cuda: nvidia/cuda 13.0.3 cuDNN runtime on Ubuntu 24.04 (Python 3.12), torch from PyPI, whose Linux
#         build targets CUDA 13.0 (needs an NVIDIA driver >= 580 on the host).

ARG VARIANT=cpu

# ---------------------------------------------------------------------------------------------------------
# Bases: identical for the builder and the runtime stage, so the virtual environment copies across.
FROM python:3.11-slim-bookworm@sha256:a36c24f9cbdf4fd0f52d67f0823eeac19c2028c637cecc392d97f980d4fec56b AS base-cpu
ENV AMDET_PYTHON=/usr/local/bin/python3 \
    AMDET_TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM nvidia/cuda:13.0.3-cudnn-runtime-ubuntu24.04@sha256:14f6d08d1cd4a96effbfe3101d0b56326f552c199d05e4979ee0bd616df5811b AS base-cuda
# Ubuntu's python3 (3.12) and venv. DL3008 (unpinned apt versions) is accepted: exact versions disappear
# from the archive with each security update and would break the build; the release is fixed by the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
ENV AMDET_PYTHON=/usr/bin/python3 \
    AMDET_TORCH_INDEX=https://pypi.org/simple

# ---------------------------------------------------------------------------------------------------------
# Builder: a virtual environment in /opt/amdet-gate with torch and amdet-gate (no compilers needed: wheels).
# DL3006 (untagged image) does not apply: base-${VARIANT} names a stage above, which is pinned by digest.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN "${AMDET_PYTHON}" -m venv /opt/amdet-gate
ENV PATH=/opt/amdet-gate/bin:${PATH}
# torch first, on its own, from the variant's index (CPU wheels or the CUDA build); the layer is cached
# across source changes.
RUN pip install --index-url "${AMDET_TORCH_INDEX}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY amdet_gate/ amdet_gate/
COPY templates/ templates/
RUN pip install . \
    && amdet-gate version

# ---------------------------------------------------------------------------------------------------------
# Runtime: the base, an unprivileged user and the virtual environment; no build files, no pip cache.
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="amdet-gate" \
      org.opencontainers.image.description="Supply-chain gate that finds injected backdoors in CLIP-style text encoders" \
      org.opencontainers.image.licenses="MIT" \
      io.amdet-gate.variant="${VARIANT}"
RUN groupadd --system --gid 10001 amdet \
    && useradd --system --uid 10001 --gid amdet --home-dir /home/amdet --create-home --shell /usr/sbin/nologin amdet \
    && mkdir -p /work /home/amdet/.cache/huggingface \
    && chown -R amdet:amdet /work /home/amdet
COPY --from=builder /opt/amdet-gate /opt/amdet-gate
ENV PATH=/opt/amdet-gate/bin:${PATH} \
    HOME=/home/amdet \
    HF_HOME=/home/amdet/.cache/huggingface \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /work
USER 10001:10001
ENTRYPOINT ["amdet-gate"]
CMD ["--help"]
