# syntax=docker/dockerfile:1
# Trainer image: what every training pod runs (`python -m trainer --spec '<RunSpec JSON>'`).
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/trainyard/trainer:0.2.0 .
# Build context: the repository root (docker/trainer.Dockerfile.dockerignore keeps it small).
# The tag must equal kubernetes.image in dags/environments/{dev,prod}.yaml (tests/deploy/test_deploy.py).
#
# Shipped == tested: the torch (2.13.0, PyPI's Linux wheel) and every other package at the
# versions of requirements.txt, on the Python minor CI runs (3.11). tests/deploy/test_trainer_image.py
# checks the pins without Docker; the build below fails unless the result is that environment.
# docs/deploy.md ("Trainer image") says how the CUDA version relates to the nodes' driver.

# uv (pinned) brings a pinned CPython 3.11 (a python-build-standalone build: Ubuntu 24.04 ships
# 3.12 only, and a PPA's python3.11 is neither pinned nor kept) and installs the pins.
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

# CUDA 13.0, the release torch 2.13.0's Linux wheel is built for (its nvidia-cuda-runtime 13.0.96 is
# CUDA 13.0 Update 2). The `base` flavour is enough: cuBLAS, cuDNN, NCCL and the other CUDA
# libraries come from torch's nvidia-* wheels; the base brings the driver requirement the NVIDIA
# Container Toolkit checks at start (NVIDIA_REQUIRE_CUDA), the toolkit's environment and the
# forward-compatibility libraries (/usr/local/cuda/compat). It declares no entrypoint we rely on:
# ENTRYPOINT below, and the pod's command, replace whatever the base declares.
FROM nvidia/cuda:13.0.2-base-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ARG PYTHON_VERSION=3.11.18
# The pip of the Makefile's venv: `pip check` below, and `pip install` for images built on this one.
ARG PIP_VERSION=26.0.1

# HF_HOME, TRAINYARD_SCRATCH and /tmp are emptyDir mounts in the pod (the root filesystem is
# read-only there), see plugins/trainyard/train/pod.py; the same paths exist here so the
# image also works under plain `docker run`. No TF32 override (NGC images set one): `tf32` is the
# trainer's own switch, as on the development machines.
# DL3064 matches "TOKEN" in TOKENIZERS_PARALLELISM, a tokenizer switch, not a credential.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LANG=C.UTF-8 \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    TRAINYARD_SCRATCH=/scratch \
    TOKENIZERS_PARALLELISM=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONPATH=/opt/trainyard

# A C/C++ compiler: Triton builds its CUDA launcher and Inductor its CPU kernels at run time
# (`training.compile: true`). ca-certificates: the CAs Python's ssl module loads (SSL_CERT_FILE:
# the bundle Ubuntu maintains, named rather than left to the default paths of uv's OpenSSL build).
# The versions follow the base image's libc6 and security updates (a pin would break on either).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates g++ libc6-dev \
    && rm -rf /var/lib/apt/lists/*

COPY --from=uv /uv /usr/local/bin/uv
RUN uv python install --no-bin "${PYTHON_VERSION}" \
    && uv venv --managed-python --python "${PYTHON_VERSION}" /opt/venv

# Every package pinned, installed as pinned: --no-deps resolves nothing, so the image gets exactly
# the two files (whose consistency the tests check) and wheels only, from PyPI.
COPY docker/trainer-requirements.txt docker/trainer-cuda-requirements.txt /opt/trainyard/
RUN uv pip install --no-deps --only-binary :all: --compile-bytecode --link-mode copy \
        --index-url https://pypi.org/simple \
        -r /opt/trainyard/trainer-requirements.txt -r /opt/trainyard/trainer-cuda-requirements.txt \
        "pip==${PIP_VERSION}"

# Fail the build unless this is the tested environment: consistent dependencies, the Python minor
# and torch of the pins, a CUDA build of torch for the base image's CUDA, numpy interop (the
# Trainer's metric gathering), the launcher flags the pods use, and the CA certificates.
RUN python -m pip check \
    && python -c "import sys; assert sys.version_info[:2] == (3, 11), sys.version" \
    && pin="$(sed -n 's/^torch==//p' /opt/trainyard/trainer-requirements.txt)" \
    && python -c "import sys, torch; assert torch.__version__.split('+')[0] == sys.argv[1], (torch.__version__, sys.argv[1])" "${pin}" \
    && python -c "import os, torch; cuda = '.'.join(os.environ['CUDA_VERSION'].split('.')[:2]); assert torch.version.cuda == cuda, (torch.version.cuda, cuda); assert torch.backends.cudnn.is_available()" \
    && python -c "import numpy, torch; a = numpy.arange(6, dtype=numpy.float32).reshape(2, 3); t = torch.from_numpy(a) * 2; assert (t.numpy() == a * 2).all(); assert torch.tensor([1.5], dtype=torch.bfloat16).float().numpy().dtype == numpy.float32" \
    && python -m torch.distributed.run --help >/tmp/torchrun-help \
    && grep -q -- '--standalone' /tmp/torchrun-help \
    && grep -qE -- '--nproc[-_]per[-_]node' /tmp/torchrun-help \
    && rm /tmp/torchrun-help \
    && python -c "import ssl; assert ssl.create_default_context().cert_store_stats()['x509_ca'] > 0, 'no CA certificates'" \
    && python -c "import accelerate, datasets, matplotlib, mlflow, pynvml, s3fs, sklearn, transformers, triton"

# uid/gid 1000 = kubernetes.run_as_user / run_as_group in the environment YAML (the pod's
# securityContext). Ubuntu 24.04 based images already have user `ubuntu` with uid 1000.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu 2>/dev/null || userdel ubuntu; fi \
    && groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash trainer \
    && mkdir -p /cache/huggingface /scratch \
    && chown -R 1000:1000 /cache /scratch

COPY --chown=0:0 trainer/ /opt/trainyard/trainer/
RUN python -m trainer --help >/dev/null && python -c "import trainer.train"

WORKDIR /scratch
USER 1000:1000

# The pod sets its own command (`python -m trainer ...`, or the launcher for several GPUs).
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]
