"""Governed promotion through real Airflow (`airflow dags test`), the real trainer and a real MLflow:
the champion re-scored on the candidate's data decides, identical inputs skip training in seconds,
``force_retrain`` trains anyway, and new data trains again.

Local launcher, tiny BERT built by the tests, its own Trainyard home (so its MLflow holds only these
runs).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.support.paths import DAGS, ROOT
from tests.support.pipelines import tiny_pipeline
from tests.support.synthetic_data import sentiment_rows, write_csv, write_splits
from tests.support.tiny_model import build_tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.extended]

PIPELINE = "tiny-governed"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, airflow_db) -> dict[str, str]:
    home = tmp_path_factory.mktemp("governed-home")
    write_splits(home / "data" / "tiny", train_rows=320, validation_rows=80)
    build_tiny_model(home / "models" / "tiny-bert")
    pipelines = tmp_path_factory.mktemp("governed-pipelines")
    document = tiny_pipeline(PIPELINE, "tiny-bert", description="Governed promotion, end to end.")
    (pipelines / f"{PIPELINE}.yaml").write_text(yaml.safe_dump(document, sort_keys=False))
    return {
        **os.environ,
        "TRAINYARD_ENV": "local",
        "TRAINYARD_HOME": str(home),
        "TRAINYARD_PIPELINES_DIR": str(pipelines),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    }


def _dags_test(
    env: dict[str, str], conf: dict | None = None
) -> tuple[subprocess.CompletedProcess[str], float]:
    argv = [sys.executable, "-m", "airflow", "dags", "test", PIPELINE]
    if conf is not None:
        argv += ["-c", json.dumps(conf)]
    started = time.monotonic()
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    return result, time.monotonic() - started


def _client(env: dict[str, str]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{env['TRAINYARD_HOME']}/mlflow.db")


def _latest_run(env: dict[str, str]):
    client = _client(env)
    experiment = client.get_experiment_by_name(PIPELINE)
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])[0]


def _task_states(env: dict[str, str], run_id: str) -> dict[str, str]:
    result = subprocess.run(
        [sys.executable, "-m", "airflow", "tasks", "states-for-dag-run", PIPELINE, run_id, "-o", "json"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return {row["task_id"]: row["state"] for row in json.loads(result.stdout)}


def _note(env: dict[str, str], run_id: str) -> str | None:
    import sqlite3

    db = Path(env["AIRFLOW_HOME"]) / "airflow.db"
    with sqlite3.connect(db) as connection:
        row = connection.execute(
            "select content from dag_run_note join dag_run on dag_run.id = dag_run_note.dag_run_id "
            "where dag_run.dag_id = ? and dag_run.run_id = ?",
            (PIPELINE, run_id),
        ).fetchone()
    return None if row is None else row[0]


def test_unchanged_inputs_skip_forced_runs_train_and_the_rescored_champion_decides(workspace):
    client = _client(workspace)

    _dags_test(workspace)
    champion = client.get_model_version_by_alias(PIPELINE, "champion")
    champion_run = client.get_run(champion.run_id)
    assert champion_run.data.tags["trainyard.content_key"].startswith("sha256:")
    assert champion_run.data.tags["trainyard.team"] == "qa"

    # Same data, same training section, same model and trainer: nothing would change.
    second, seconds = _dags_test(workspace)
    output = second.stdout + second.stderr
    skipped = _latest_run(workspace)
    run_id = skipped.data.tags["airflow.run_id"]
    assert skipped.data.tags["trainyard.outcome"] == "skipped"
    assert skipped.data.tags["trainyard.skipped_for"] == champion.run_id
    reason = (
        f"identical inputs to run {champion_run.data.tags['airflow.run_id']} (version {champion.version})"
    )
    assert skipped.data.tags["trainyard.skip_reason"] == reason
    assert reason in output and "Starting trainer" not in output
    states = _task_states(workspace, run_id)
    assert states == {"validate_data": "success", "train": "skipped", "promote": "skipped"}, states
    assert _note(workspace, run_id).startswith(f"Skipped: {reason}.")
    assert seconds < 120, f"a skipped run took {seconds:.0f} s"
    summary = subprocess.run(
        [str(Path(sys.executable).parent / "trainyard"), "summary", PIPELINE],
        env=workspace,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"SKIPPED as unchanged: {reason}." in summary and "force_retrain" in summary
    assert client.get_model_version_by_alias(PIPELINE, "champion").version == champion.version

    # Forced: trains, and the champion is scored on the same validation data with the same code.
    _dags_test(workspace, {"force_retrain": True})
    forced = _latest_run(workspace)
    assert "trainyard.outcome" not in forced.data.tags and forced.info.status == "FINISHED"
    assert forced.data.tags["trainyard.champion.version"] == str(champion.version)
    for metric in ("eval_accuracy", "eval_f1_macro", "eval_loss"):
        assert forced.data.metrics[f"champion_{metric}"] == pytest.approx(
            champion_run.data.metrics[metric], abs=1e-4
        ), "the same model on the same data scores what it scored when it was trained"
    (version,) = client.search_model_versions(f"name = '{PIPELINE}' and run_id = '{forced.info.run_id}'")
    assert version.tags["trainyard.champion_value_source"] == "rescored"
    assert (
        version.tags["trainyard.compared_on_fingerprint"] == forced.data.tags["trainyard.dataset_fingerprint"]
    )
    assert version.tags["trainyard.evaluation"] == f"runs:/{forced.info.run_id}/evaluation"
    artifacts = {a.path for a in client.list_artifacts(forced.info.run_id, "evaluation")}
    assert {
        "evaluation/per_class.json",
        "evaluation/confusion_candidate.png",
        "evaluation/confusion_champion.png",
    } <= artifacts

    # New validation data: trains, and both models are scored on the new data, not the old.
    data = Path(workspace["TRAINYARD_HOME"]) / "data" / "tiny"
    write_csv(data / "validation.csv", sentiment_rows(60, seed=7, prefix="w"))
    holder = client.get_model_version_by_alias(PIPELINE, "champion")
    holder_run = client.get_run(holder.run_id)
    _dags_test(workspace)
    fresh = _latest_run(workspace)
    assert "trainyard.outcome" not in fresh.data.tags, "new bytes are never skipped"
    assert (
        fresh.data.tags["trainyard.dataset_fingerprint"]
        != holder_run.data.tags["trainyard.dataset_fingerprint"]
    )
    rescored = fresh.data.metrics["champion_eval_loss"]
    assert rescored != pytest.approx(holder_run.data.metrics["eval_loss"], abs=1e-6), (
        "the champion's loss on the new validation split is not the loss it recorded on its own"
    )
    (latest,) = client.search_model_versions(f"name = '{PIPELINE}' and run_id = '{fresh.info.run_id}'")
    assert float(latest.tags["trainyard.champion_value"]) == fresh.data.metrics["champion_eval_accuracy"]
    assert float(latest.tags["trainyard.champion_recorded_value"]) == holder_run.data.metrics["eval_accuracy"]
