# syntax=docker/dockerfile:1
# MLflow tracking server, for the cluster (helm-values/mlflow: server and migration init container)
# and the compose stack:
#   docker build -f docker/mlflow.Dockerfile -t ghcr.io/trainyard/mlflow:3.17.2 .
# mlflow comes from PyPI at the version of requirements.txt (the tag names it), so client and
# server run one MLflow and the database schema is migrated by that same version; no third-party
# server image to trust. docker/mlflow-requirements.txt adds the PostgreSQL driver, boto3 (the
# proxied s3:// artifact destination), the Prometheus exporter behind --expose-prometheus and
# Flask-WTF, mlflow[auth]'s one extra, for the access control of --app-name basic-auth.
FROM python:3.11-slim-bookworm

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MLFLOW_DISABLE_TELEMETRY=true

COPY docker/mlflow-requirements.txt /tmp/mlflow-requirements.txt
RUN pip install --no-cache-dir -r /tmp/mlflow-requirements.txt \
    && python -c "import mlflow, psycopg2, boto3, prometheus_flask_exporter, flask_wtf, mlflow.server.auth" \
    && groupadd --gid 1001 mlflow \
    && useradd --uid 1001 --gid 1001 --no-create-home --home-dir /tmp mlflow

# uid 1001 is the community-charts/mlflow securityContext (runAsUser/runAsGroup 1001).
USER 1001:1001
WORKDIR /tmp
EXPOSE 5000
CMD ["mlflow", "server", "--host=0.0.0.0", "--port=5000"]
