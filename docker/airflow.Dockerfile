# syntax=docker/dockerfile:1
# Airflow image: Airflow 3.3.2 with Trainyard's Airflow side. No torch.
#   docker build -f docker/airflow.Dockerfile --target airflow -t ghcr.io/trainyard/airflow:0.1.0 .
# Target `airflow-local` adds a CPU-only trainer for the compose stack (launcher: local); it is
# never deployed to a cluster. Build context: the repository root.

FROM apache/airflow:3.3.2-python3.11 AS airflow

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    AIRFLOW__CORE__LOAD_EXAMPLES=False \
    TRAINYARD_ENV=dev

# apache-airflow is named with its version so that no requirement can up- or downgrade it.
COPY docker/airflow-requirements.txt /tmp/airflow-requirements.txt
RUN pip install --no-cache-dir "apache-airflow==3.3.2" -r /tmp/airflow-requirements.txt

# `trainyard` (plugins/trainyard) and `trainer` (its input contract trainer/spec.py and
# trainer/storage.py are imported by the Airflow side) are installed as packages, with the
# `trainyard` command; the DAG file imports them from site-packages.
COPY --chown=airflow:0 pyproject.toml README.md /opt/trainyard/
COPY --chown=airflow:0 plugins/ /opt/trainyard/plugins/
COPY --chown=airflow:0 trainer/ /opt/trainyard/trainer/
RUN pip install --no-cache-dir --no-deps /opt/trainyard \
    && python -c "import trainyard.dag, trainer.spec"

# DAGs and YAML baked in for deployments without git-sync (git-sync mounts over this folder).
COPY --chown=airflow:0 dags/ /opt/airflow/dags/


FROM airflow AS airflow-local

# The compose stack trains with `launcher: local`, in the Airflow worker itself: CPU torch and
# the trainer's pinned dependencies (the same pins as the trainer image).
COPY docker/trainer-requirements.txt /tmp/trainer-requirements.txt
RUN pip install --no-cache-dir "apache-airflow==3.3.2" "torch==2.13.0+cpu" \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -r /tmp/trainer-requirements.txt

# The compose environment file next to the real ones: pipelines that override `dev` or `prod`
# must still find those environments (TRAINYARD_ENVIRONMENTS_DIR replaces the whole folder).
COPY --chown=airflow:0 dags/environments/ /opt/trainyard/environments/
COPY --chown=airflow:0 docker/environments/compose.yaml /opt/trainyard/environments/compose.yaml
ENV TRAINYARD_ENV=compose \
    TRAINYARD_ENVIRONMENTS_DIR=/opt/trainyard/environments
