# syntax=docker/dockerfile:1
# Trainer image: what every training pod runs (`python -m trainer --spec '<RunSpec JSON>'`).
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/trainyard/trainer:0.1.0 .
# Build context: the repository root (docker/trainer.Dockerfile.dockerignore keeps it small).
# The tag must equal kubernetes.image in dags/environments/{dev,prod}.yaml (tests/deploy/test_deploy.py).

# NVIDIA's PyTorch image: CUDA, cuDNN, NCCL and a torch build tuned for them (Python 3.12).
FROM nvcr.io/nvidia/pytorch:25.04-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# HF_HOME, TRAINYARD_SCRATCH and /tmp are emptyDir mounts in the pod (the root filesystem is
# read-only there), see plugins/trainyard/train/pod_operator.py; the same paths exist here so the
# image also works under plain `docker run`.
# DL3064 matches "TOKEN" in TOKENIZERS_PARALLELISM, a tokenizer switch, not a credential.
# hadolint ignore=DL3064
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/cache/huggingface \
    TRAINYARD_SCRATCH=/scratch \
    TOKENIZERS_PARALLELISM=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    PYTHONPATH=/opt/trainyard

COPY docker/trainer-requirements.txt /tmp/trainer-requirements.txt
RUN pip install --no-cache-dir -r /tmp/trainer-requirements.txt \
    && rm /tmp/trainer-requirements.txt \
    && python -c "import torch, transformers, datasets, mlflow, s3fs, matplotlib; print(torch.__version__, transformers.__version__)"

# uid/gid 1000 = kubernetes.run_as_user / run_as_group in the environment YAML (the pod's
# securityContext). Ubuntu 24.04 based images already have user `ubuntu` with uid 1000.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel --remove ubuntu 2>/dev/null || userdel ubuntu; fi \
    && groupadd --gid 1000 trainer \
    && useradd --uid 1000 --gid 1000 --create-home --shell /bin/bash trainer \
    && mkdir -p /cache/huggingface /scratch \
    && chown -R 1000:1000 /cache /scratch

COPY --chown=0:0 trainer/ /opt/trainyard/trainer/

WORKDIR /scratch
USER 1000:1000

# The pod sets its own command (`python -m trainer ...`, or torchrun for several GPUs).
ENTRYPOINT ["python", "-m", "trainer"]
CMD ["--help"]
