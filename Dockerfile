# llmtune for NVIDIA GPUs.
#
#   docker build -t llmtune .
#   docker run --rm --gpus all --ipc=host -v "$PWD":/work -v llmtune-hf:/cache/hf llmtune train recipe.yaml
#
# The CUDA *devel* image is deliberate: it carries nvcc and the CUDA headers, so DeepSpeed can JIT-build its
# ops (fused Adam, ...) at run time, and flash-attn can compile at build time when no prebuilt wheel fits.
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

# The CUDA build of torch, pinned; it must match the image's CUDA major version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Parallel compile jobs for flash-attn / DeepSpeed builds (each job can take several GB of RAM).
ARG MAX_JOBS=4

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Ubuntu's python3 (3.12 on 24.04) with venv, and its headers for building extensions.
# The distribution's package versions are fixed by the pinned base image, so they are not pinned here.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates \
        git \
        python3 \
        python3-dev \
        python3-venv \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf

# The build tools (flash-attn and DeepSpeed build against the installed torch, hence no build isolation
# below), then torch itself: the heavy layer, kept before the source is copied so it stays cached.
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir \
        pip==26.3 \
        setuptools==84.2.1 \
        wheel==0.48.0 \
        packaging==26.3 \
        ninja==1.13.2 \
        psutil==7.2.2 \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /opt/llmtune
COPY . .
# Naming the torch pin again keeps pip from replacing the CUDA build while it resolves the rest.
RUN pip install --no-cache-dir --no-build-isolation "/opt/llmtune[gpu]" "torch==${TORCH_VERSION}" \
    && llmtune version

# A non-root user (uid 1000, in place of the base image's "ubuntu" user), owning the work and cache folders.
RUN userdel --remove ubuntu 2>/dev/null || true; \
    useradd --create-home --uid 1000 --shell /bin/bash llmtune \
    && mkdir -p /work "$HF_HOME" \
    && chown llmtune:llmtune /work "$HF_HOME"

USER 1000:1000
WORKDIR /work
ENTRYPOINT ["llmtune"]
CMD ["--help"]
