"""The whole pipeline through real Airflow (`airflow dags test`), a real trainer and a real MLflow.

Uses the local launcher with a tiny BERT built by the tests, so a run takes seconds of training.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.support.paths import DAGS, ROOT
from tests.support.pipelines import tiny_pipeline
from tests.support.registry import alias_holder, assert_verdict_follows_the_numbers
from tests.support.synthetic_data import unpunctuated_text, write_long_splits, write_splits
from tests.support.tiny_model import build_tiny_model

pytestmark = pytest.mark.slow

PIPELINE = "tiny-sentiment"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, airflow_db) -> dict[str, str]:
    home = tmp_path_factory.mktemp("trainyard-home")
    write_splits(home / "data" / "tiny", train_rows=320, validation_rows=80)
    build_tiny_model(home / "models" / "tiny-bert")
    write_long_splits(home / "data" / "long", train_rows=160, validation_rows=40, words=1000)
    build_tiny_model(home / "models" / "tiny-bert-64", max_position_embeddings=64)
    pipelines = tmp_path_factory.mktemp("pipelines")
    (pipelines / f"{PIPELINE}.yaml").write_text(
        yaml.safe_dump(
            tiny_pipeline(PIPELINE, "tiny-bert", description="Tiny BERT on synthetic sentiment, end to end."),
            sort_keys=False,
        )
    )
    env = {
        **os.environ,
        "TRAINYARD_ENV": "local",
        "TRAINYARD_HOME": str(home),
        "TRAINYARD_PIPELINES_DIR": str(pipelines),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
    }
    return env


def _dags_test(
    env: dict[str, str], conf: dict | None = None, pipeline: str = PIPELINE
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "airflow", "dags", "test", pipeline]
    if conf is not None:
        argv += ["-c", json.dumps(conf)]
    return subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)


def _dags_test_once(env: dict[str, str], document: dict) -> subprocess.CompletedProcess[str]:
    """``airflow dags test`` of a pipeline that exists only for this call."""
    path = Path(env["TRAINYARD_PIPELINES_DIR"]) / f"{document['name']}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    try:
        return _dags_test(env, pipeline=document["name"])
    finally:
        path.unlink()


def _mlflow(env: dict[str, str]):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{env['TRAINYARD_HOME']}/mlflow.db")


def _runs(env: dict[str, str]):
    client = _mlflow(env)
    experiment = client.get_experiment_by_name(PIPELINE)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"])


def test_bad_conf_is_rejected_before_training(workspace):
    result = _dags_test(workspace, {"epochs": 1, "image": "attacker/image:1"})
    output = result.stdout + result.stderr
    assert "Trigger conf rejected for pipeline 'tiny-sentiment'" in output
    assert "'image' is not a known setting" in output
    assert "Allowed keys: epochs, learning_rate, max_steps" in output
    assert "Starting trainer" not in output, "the trainer never started"
    assert _runs(workspace) == [], "no MLflow run was created"


def test_a_run_trains_tracks_and_promotes(workspace):
    result = _dags_test(workspace)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Data validation report" in output
    (run,) = _runs(workspace)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainyard.pipeline"] == PIPELINE
    assert run.data.tags["trainyard.environment"] == "local"
    assert run.data.tags["trainyard.dataset_fingerprint"].startswith("sha256:")
    assert run.data.tags["airflow.dag_id"] == PIPELINE
    client = _mlflow(workspace)
    champion = client.get_model_version_by_alias(PIPELINE, "champion")
    assert champion.run_id == run.info.run_id
    assert champion.tags["trainyard.decision"] == "promoted"
    assert champion.tags["airflow.run_id"] == run.data.tags["airflow.run_id"]


def test_conf_overrides_reach_the_trainer(workspace):
    client = _mlflow(workspace)
    champion_before = alias_holder(client, PIPELINE)
    result = _dags_test(workspace, {"learning_rate": 0.0005, "max_steps": 7})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    latest = _runs(workspace)[0]
    assert float(latest.data.params["learning_rate"]) == 0.0005
    assert latest.data.params["max_steps"] == "7"
    # The test does not choose the verdict, but the numbers decide it: check it follows them.
    (version,) = client.search_model_versions(f"name = '{PIPELINE}' and run_id = '{latest.info.run_id}'")
    assert_verdict_follows_the_numbers(client, PIPELINE, version, "eval_accuracy", champion_before)


def test_summary_reads_the_latest_run(workspace):
    result = subprocess.run(
        [str(Path(sys.executable).parent / "trainyard"), "summary", PIPELINE],
        env=workspace,
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert f"Pipeline {PIPELINE} (environment local)" in result.stdout
    assert "eval_accuracy=" in result.stdout and "Current champion:" in result.stdout


def test_a_timed_out_train_task_stops_its_trainer_with_a_checkpoint(workspace, tmp_path):
    """The local twin of "a pod never outlives its task": a timeout SIGTERMs the trainer."""
    import psutil

    environments = tmp_path / "environments"
    environments.mkdir()
    for source in (DAGS / "environments").glob("*.yaml"):
        text = source.read_text()
        if source.name == "local.yaml":
            # 45 s: the trainer starts (imports, model, MLflow run) in about 15 s on a busy 2-core
            # machine, and the timeout must land during training for a checkpoint to be saved.
            text = text.replace("execution_timeout_minutes: 120", "execution_timeout_minutes: 0.75")
            assert "execution_timeout_minutes: 0.75" in text
        (environments / source.name).write_text(text)
    env = {**workspace, "TRAINYARD_ENVIRONMENTS_DIR": str(environments), "OMP_NUM_THREADS": "1"}
    result = _dags_test(env, {"max_steps": 100000, "epochs": 100})
    output = result.stdout + result.stderr
    assert "Stopping the trainer" in output, output[-4000:]
    timeout = re.search(
        r"^airflow\.sdk\.exceptions\.AirflowTaskTimeout: Timeout, PID: \d+$", output, re.MULTILINE
    )
    assert timeout, "the task failed with Airflow's execution timeout, not another error"
    timed_out = output.find("Process timed out")
    assert 0 <= timed_out < output.index("Stopping the trainer"), "the timeout is what stopped the trainer"
    during_training = re.search(r"trainer\.efficiency: step \d+/", output[:timed_out])
    assert during_training, "the timeout fired during training"
    leftovers = [
        p.info["pid"]
        for p in psutil.process_iter(["pid", "cmdline"])
        if "trainer" in (p.info["cmdline"] or [])
        and "--spec" in (p.info["cmdline"] or [])
        and workspace["TRAINYARD_HOME"] in " ".join(p.info["cmdline"])
    ]
    assert leftovers == [], "no trainer process outlives the task"
    checkpoints = Path(workspace["TRAINYARD_HOME"]) / "checkpoints" / PIPELINE
    assert list(checkpoints.glob("*/*/checkpoint-*")), "the trainer saved a checkpoint on SIGTERM"


def test_bad_data_stops_the_run_before_training(workspace):
    name = "tiny-bad-data"
    document = tiny_pipeline(name, "tiny-bert", description="Asks for more rows than the data has.")
    document["dataset"]["checks"] = {"min_rows": 100_000, "min_validation_rows": 20}
    result = _dags_test_once(workspace, document)
    output = result.stdout + result.stderr
    assert "Dataset validation failed: 1 of 17 checks failed" in output, output[-4000:]
    assert "min_rows [train]" in output and "relax dataset.checks" in output
    assert "Starting trainer" not in output


def test_long_documents_train_log_register_and_serve(workspace):
    """~1,000-word texts, ``model.max_length: 256``, a model with 64 positions: the failure class where
    logging the model used to run it on untruncated texts after a full training."""
    name = "tiny-long-docs"
    document = tiny_pipeline(
        name,
        "tiny-bert-64",
        description="Long documents beyond the model's position limit.",
        dataset={
            "train": "long/train.csv",
            "validation": "long/validation.csv",
            "label_names": ["negative", "positive"],
            "checks": {"min_rows": 100, "min_validation_rows": 20},
        },
        model={"base": "tiny-bert-64", "max_length": 256},
    )
    result = _dags_test_once(workspace, document)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "truncating to 64 tokens" in output

    client = _mlflow(workspace)
    (run,) = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    assert run.info.status == "FINISHED"
    assert f"Training finished: MLflow run {run.info.run_id}, step " in output
    (version,) = client.search_model_versions(f"name = '{name}'")
    assert version.run_id == run.info.run_id
    assert version.tags["trainyard.decision"] == "promoted", "the first version, and no must_reach"
    assert alias_holder(client, name) == str(version.version)

    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workspace['TRAINYARD_HOME']}/mlflow.db")
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version.version}")
    predictions = model.predict([unpunctuated_text(2000), " ".join(["A long, fine article."] * 500)])
    assert set(predictions["label"]) <= {"negative", "positive"} and len(predictions) == 2
