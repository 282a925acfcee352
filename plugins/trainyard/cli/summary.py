"""A human summary of a pipeline's latest run, read back from MLflow (the system of record)."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from trainer.spec import (
    CHAMPION_METRIC_PREFIX,
    EVAL_METRICS,
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_TERMINATED,
    OUTCOME_SKIPPED,
    STAGE_SETUP,
    STAGES_AFTER_TRAINING,
    TAG_CHAMPION_SCORED_VERSION,
    TAG_CHAMPION_UNSCORABLE,
    TAG_CHECKPOINT_STEP,
    TAG_ERROR,
    TAG_ERROR_STAGE,
    TAG_EXIT_CODE,
    TAG_OUTCOME,
    TAG_PIPELINE,
    TAG_SKIP_REASON,
    TAG_TRY_NUMBER,
)
from trainyard.config.loading import ResolvedPipeline
from trainyard.promote.audit import Audit


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


#: Causes recognisable in an error message, and what fixes them (checked in order).
KNOWN_CAUSES: tuple[tuple[tuple[str, ...], str], ...] = (
    (
        ("out of memory", "outofmemoryerror"),
        "the GPU ran out of memory: lower training.batch_size (raise gradient_accumulation_steps to keep "
        "the effective batch) or model.max_length",
    ),
    (
        ("no space left on device",),
        "a disk is full: free space in the checkpoint or scratch location, or raise the pod's volume",
    ),
    (
        ("accessdenied", "access denied", "permission denied", "forbidden"),
        "the trainer may not read or write a location: check the credentials and the bucket policy",
    ),
)


def _known_cause(error: str) -> str | None:
    lowered = error.lower()
    return next((fix for needles, fix in KNOWN_CAUSES if any(n in lowered for n in needles)), None)


def failure_hint(stage: str, exit_code: int | None, checkpoint_step: str | None) -> str:
    """What to do about a stopped run, from where it stopped and how the trainer exited."""
    resume = f"resumes from the checkpoint at step {checkpoint_step}" if checkpoint_step else "starts afresh"
    if exit_code == EXIT_BAD_INPUT:
        return (
            "the run cannot succeed as specified: fix what the error names (data, labels or "
            "model.base) and trigger a new run; retrying the same run fails the same way"
        )
    if exit_code in (EXIT_TERMINATED, EXIT_INTERRUPTED):
        return f"the trainer was stopped (preempted, timed out or killed): clear the train task; it {resume}"
    if stage in STAGES_AFTER_TRAINING:
        return (
            f"training completed and its weights are kept (step {checkpoint_step}): fix the cause, then "
            f"clear the train task; the retry resumes at that step, does not train again and repeats "
            f"only {stage} and what follows"
        )
    if stage == STAGE_SETUP:
        return "the run failed before training started: check the tracking server and storage, then retry"
    return f"fix the cause, then clear the train task (or let Airflow retry it); the retry {resume}"


def failure_lines(status: str, tags: dict[str, str]) -> list[str]:
    """Why a FAILED or KILLED run stopped (the trainer's own record on the run) and what to do."""
    if status not in ("FAILED", "KILLED"):
        return []
    error = tags.get(TAG_ERROR)
    if error is None:
        return [
            "Failed: the trainer recorded no error (it was killed outright, e.g. OOMKilled, or predates "
            "error tags): see the train task's log in Airflow"
        ]
    stage = tags.get(TAG_ERROR_STAGE, "?")
    code = tags.get(TAG_EXIT_CODE)
    exit_code = int(code) if code and code.lstrip("-").isdigit() else None
    try_number = tags.get(TAG_TRY_NUMBER)
    lines = [
        f"Failed in {stage} (trainer exit code {code or '?'}): {error}",
        f"What to do: {failure_hint(stage, exit_code, tags.get(TAG_CHECKPOINT_STEP))}",
    ]
    cause = _known_cause(error)
    if cause:
        lines.append(f"Likely cause: {cause}")
    lines.append(
        f"Full traceback: the Airflow log of task train{f' (try {try_number})' if try_number else ''}"
    )
    return lines


def champion_lines(metrics: dict[str, float], tags: dict[str, str]) -> list[str]:
    """The champion as the trainer re-scored it on this run's validation data, or why it could not."""
    version = tags.get(TAG_CHAMPION_SCORED_VERSION)
    if tags.get(TAG_CHAMPION_UNSCORABLE):
        return [f"Champion on this data: not scored ({tags[TAG_CHAMPION_UNSCORABLE]})"]
    scored = {
        k: metrics[CHAMPION_METRIC_PREFIX + k] for k in EVAL_METRICS if CHAMPION_METRIC_PREFIX + k in metrics
    }
    if not version or not scored:
        return []
    values = ", ".join(f"{k}={v:.4f}" for k, v in scored.items())
    return [f"Champion v{version} on this run's validation data: {values}"]


def skipped_lines(pipeline: ResolvedPipeline, run: Any, client: Any) -> list[str]:
    """A DAG run that trained nothing: which run it repeats, and how to train anyway."""
    tags = run.data.tags
    lines = [
        f"Pipeline {pipeline.name} (environment {pipeline.environment.name})",
        f"Airflow run: {tags.get('airflow.run_id')}",
        f"SKIPPED as unchanged: {tags.get(TAG_SKIP_REASON, 'identical inputs to an earlier run')}.",
        "Nothing was trained or registered: the data (fingerprint "
        f"{tags.get('trainyard.dataset_fingerprint', '?')[:19]}...), the training section, the base model "
        "and the trainer are those of that run.",
        f"To train anyway: airflow dags test {pipeline.name} -c '{{\"force_retrain\": true}}' "
        f"(or tick force_retrain in the trigger form).",
    ]
    try:
        champion = client.get_model_version_by_alias(
            pipeline.registered_model_name, pipeline.config.promotion.alias
        )
        lines.append(
            f"Current {pipeline.config.promotion.alias}: {pipeline.registered_model_name} v{champion.version}"
        )
    except Exception:  # no alias yet
        lines.append(f"Current {pipeline.config.promotion.alias}: none")
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
    if run.data.tags.get(TAG_OUTCOME) == OUTCOME_SKIPPED:
        return "\n".join(skipped_lines(pipeline, run, client))
    metrics = run.data.metrics
    lines = [
        f"Pipeline {pipeline.name} (environment {pipeline.environment.name})",
        f"Airflow run: {run.data.tags.get('airflow.run_id')}",
        "Validation:",
        *_validation_lines(client, run.info.run_id),
        f"MLflow run: {run.info.run_id} ({run.info.status}) in experiment '{pipeline.experiment_name}'",
        *failure_lines(run.info.status, run.data.tags),
        "Metrics: "
        + (
            ", ".join(
                f"{k}={metrics[k]:.4f}"
                for k in ("eval_accuracy", "eval_f1_macro", "eval_loss")
                if k in metrics
            )
            or "none (not evaluated)"
        ),
    ]
    lines += champion_lines(metrics, run.data.tags)
    name = pipeline.registered_model_name
    versions = client.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
    if versions:
        version = versions[0]
        audit = Audit.from_tags(version.tags)
        verdict = f"{audit.verdict.upper()}: {audit.reason}" if audit else "UNDECIDED: "
        lines.append(f"Model version: {name} v{version.version}: {verdict}")
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
