# syntax=docker/dockerfile:1
# MLflow tracking server for the compose stack: the official image plus the PostgreSQL driver
# and boto3. (The cluster uses the community-charts/mlflow chart, see helm-values/mlflow/.)
FROM ghcr.io/mlflow/mlflow:v3.17.2

COPY docker/mlflow-requirements.txt /tmp/mlflow-requirements.txt
RUN pip install --no-cache-dir -r /tmp/mlflow-requirements.txt

USER 1000:1000
EXPOSE 5000
