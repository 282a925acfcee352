"""A human summary of a pipeline's latest run, read back from MLflow (the system of record)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from trainer.spec import TAG_PIPELINE
from trainyard.config import ResolvedPipeline
from trainyard.promotion import TAG_DECISION, TAG_REASON


def _validation_lines(client: Any, run_id: str) -> list[str]:
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "validation_report.json", tmp)
        except (MlflowException, OSError):  # a run without the report still gets a summary
            return ["  (no validation report logged)"]
        report = json.loads(Path(path).read_text())
    checks = report.get("checks", [])
    failed = [c for c in checks if not c.get("passed")]
    verdict = "PASSED" if report.get("passed") else "FAILED"
    lines = [f"  {verdict}: {len(checks) - len(failed)} of {len(checks)} checks passed"]
    for split, stats in report.get("splits", {}).items():
        labels = ", ".join(f"{name} {count:,}" for name, count in (stats.get("label_counts") or {}).items())
        lines.append(f"  {split}: {stats.get('rows', 0):,} rows ({labels})")
    lines += [f"  FAILED {c.get('name')} [{c.get('split')}]: {c.get('message')}" for c in failed]
    lines.append(f"  dataset fingerprint {report.get('fingerprint')}")
    return lines


def latest_summary(pipeline: ResolvedPipeline) -> str:
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    tracking_uri = pipeline.environment.mlflow.tracking_uri
    client = MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name(pipeline.experiment_name)
    if experiment is None:
        return f"No MLflow experiment '{pipeline.experiment_name}' yet: the pipeline has not run."
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pipeline.name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        return f"No runs of '{pipeline.name}' in experiment '{pipeline.experiment_name}'."
    run = runs[0]
    metrics = run.data.metrics
    lines = [
        f"Pipeline {pipeline.name} (environment {pipeline.environment.name})",
        f"Airflow run: {run.data.tags.get('airflow.run_id')}",
        "Validation:",
        *_validation_lines(client, run.info.run_id),
        f"MLflow run: {run.info.run_id} ({run.info.status}) in experiment '{pipeline.experiment_name}'",
        "Metrics: "
        + ", ".join(
            f"{k}={metrics[k]:.4f}" for k in ("eval_accuracy", "eval_f1_macro", "eval_loss") if k in metrics
        ),
    ]
    name = pipeline.registered_model_name
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if versions:
        version = versions[0]
        tags = version.tags
        decision = tags.get(TAG_DECISION, "undecided").upper()
        reason = tags.get(TAG_REASON, "")
        lines.append(f"Model version: {name} v{version.version}: {decision}: {reason}")
    else:
        lines.append(f"Model version: none registered in '{name}' for this run")
    rule = pipeline.config.promotion
    try:
        champion = client.get_model_version_by_alias(name, rule.alias)
        lines.append(f"Current {rule.alias}: {name} v{champion.version}")
    except MlflowException:  # no alias yet
        lines.append(f"Current {rule.alias}: none")
    if tracking_uri.startswith("sqlite:"):
        lines.append(
            f"Open the MLflow UI: .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000"
        )
    else:
        lines.append(f"MLflow UI: {tracking_uri}")
    return "\n".join(lines)
