"""``trainer.train.run`` for real: a tiny BERT trains in a subprocess, MLflow on a SQLite file, no mocks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.s3 import CREDENTIALS
from tests.support.synthetic_data import unpunctuated_text
from tests.support.trainer_runs import (
    TIMEOUT_S,
    child_env,
    long_spec,
    make_spec,
    mlflow_client,
    result_of,
    run_trainer,
    trainer_command,
)
from trainer.spec import EVAL_METRICS, MODEL_ARTIFACT, RunSpec, run_tags


@pytest.mark.slow
def test_trains_logs_to_mlflow_and_removes_checkpoints(tmp_path, tiny_model, splits):
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]))
    proc = run_trainer(spec, child_env(tmp_path))
    result = result_of(proc)

    assert re.search(r"step \d+/75 .* loss [\d.]+ .* lr .* samples/s  ETA ", proc.stderr)
    assert "it/s]" not in proc.stderr, "no tqdm bars when stderr is not a terminal"
    assert not (tmp_path / "checkpoints").exists()

    client = mlflow_client(spec)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    identity = RunSpec.model_validate(spec).identity
    expected_tags = run_tags(identity, spec["dataset_fingerprint"])
    assert {k: run.data.tags.get(k) for k in expected_tags} == expected_tags
    assert run.data.tags["trainyard.model_uri"] == result["model_uri"]
    assert "trainyard.resumed_from_step" not in run.data.tags

    params = run.data.params
    assert params["learning_rate"] == "0.001"
    assert params["batch_size"] == "16"
    assert params["model.base"] == str(tiny_model)
    assert params["data.label_names"] == "negative,positive"
    assert params["data.train_rows"] == "400"
    assert params["data.validation_rows"] == "100"
    assert params["dataset_fingerprint"] == spec["dataset_fingerprint"]
    assert params["precision_effective"] == "fp32"

    metrics = run.data.metrics
    for name in EVAL_METRICS:
        assert result["metrics"][name] == pytest.approx(metrics[name])
    assert 0.0 <= metrics["eval_f1_macro"] <= 1.0
    assert 0.8 <= metrics["eval_accuracy"] <= 1.0, "the synthetic data is learnable"
    assert metrics["eval_loss"] < 0.5, "well below log(2) = 0.69, the loss of a coin flip"
    assert {"train_runtime", "train_samples_per_second", "loss", "learning_rate"} <= set(metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) > 5

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "validation_report.json" in artifacts

    import mlflow

    model = mlflow.pyfunc.load_model(result["model_uri"])
    predictions = model.predict(["the movie love great wonderful day", "the game awful terrible bad phone"])
    assert list(predictions["label"]) == ["positive", "negative"]
    # Promotion registers the model by the URI in the trainyard.model_uri tag.
    version = mlflow.register_model(result["model_uri"], "tweet-sentiment")
    assert version.run_id == run.info.run_id
    logged = mlflow.get_logged_model(result["model_uri"].removeprefix("models:/"))
    assert logged.name == MODEL_ARTIFACT
    requirements = (Path(logged.artifact_location) / "requirements.txt").read_text().split()
    assert any(r.startswith("transformers==") for r in requirements)
    assert any(re.fullmatch(r"torch==[\d.]+", r) for r in requirements)


@pytest.mark.slow
def test_torchrun_with_two_processes_logs_one_run_from_rank_zero(tmp_path, tiny_model, splits):
    """The multi-GPU path (gpus > 1 runs torchrun) on CPU: two gloo ranks, one MLflow run."""
    spec = make_spec(tmp_path, str(tiny_model), str(splits[0]), str(splits[1]), max_steps=12)
    spec["hyperparameters"]["checkpoint_every_steps"] = 5
    torchrun = str(Path(sys.executable).parent / "torchrun")
    argv = [torchrun, "--standalone", "--nproc_per_node=2", *trainer_command(spec)[1:]]
    env = child_env(tmp_path)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    result = result_of(proc)
    assert "[rank 0]" in proc.stderr
    client = mlflow_client(spec)
    experiment = client.get_experiment_by_name("tweet-sentiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == result["mlflow_run_id"] and run.info.status == "FINISHED"
    assert result["global_step"] == 12
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_compute_metrics_on_a_known_confusion_matrix():
    """The promotion metric itself: macro F1 counts every class, including one never predicted."""
    import numpy as np

    from trainer.train import compute_metrics

    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 0, 1, 0, 1, 1])  # class 2 never predicted
    logits = np.eye(3)[predicted]
    metrics = compute_metrics((logits, labels))
    assert metrics["accuracy"] == pytest.approx(3 / 6)
    f1 = [2 * 2 / (2 * 2 + 1), 2 * 1 / (2 * 1 + 3), 0.0]  # per class: 2tp / (2tp + fp + fn)
    assert metrics["f1_macro"] == pytest.approx(sum(f1) / 3)


# -- no work lost to a failure after training ----------------------------------------------------


PROGRESS_LINE = re.compile(r"step \d+/\d+ +epoch")


def block_model_artifacts(artifact_location: Path) -> Path:
    """The failure injected after training: a regular file where MLflow 3 puts logged models
    (``<experiment artifact location>/models/``), so ``log_model`` really fails writing there
    (``NotADirectoryError``/``FileExistsError``) while the run's own artifacts still work."""
    artifact_location.mkdir(parents=True, exist_ok=True)
    blocker = artifact_location / "models"
    blocker.write_text("not a directory: logging a model here fails\n")
    return blocker


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_failure_after_training_is_retried_without_training_again(
    tmp_path, tiny_model_64, long_splits, storage, request
):
    """13 steps, a checkpoint every 5: the final step is no multiple of it and must still be kept."""
    spec = long_spec(tmp_path, tiny_model_64, long_splits, max_steps=13, checkpoint_every_steps=5)
    env = child_env(tmp_path)
    if storage == "s3":
        server = request.getfixturevalue("s3")
        endpoint, credentials = server.endpoint, dict(CREDENTIALS)
        spec.update(s3_endpoint_url=endpoint, checkpoint_dir="s3://trainyard/checkpoints/run-1")
        env = child_env(tmp_path, TRAINYARD_SCRATCH=str(tmp_path / "pod-1"), **credentials)
    blocker = block_model_artifacts(Path(spec["mlflow"]["artifact_location"]))

    first = run_trainer(spec, env)
    assert first.returncode == 1, first.stderr[-4000:]
    assert "Training complete at step 13; final checkpoint checkpoint-13" in first.stderr
    assert "Failed in model logging after training completed at step 13" in first.stderr
    client = mlflow_client(spec)
    (run,) = client.search_runs([client.get_experiment_by_name("tweet-sentiment").experiment_id])
    assert run.info.status == "FAILED"
    tags = run.data.tags
    assert tags["trainyard.error_stage"] == "model logging"
    assert tags["trainyard.exit_code"] == "1"
    assert tags["trainyard.checkpoint_step"] == "13"
    error = tags["trainyard.error"]
    assert re.match(r"(NotADirectoryError|FileExistsError|OSError|MlflowException): ", error), error
    assert "eval_accuracy" in run.data.metrics, "evaluation ran before logging failed"
    trained_loss_points = len(client.get_metric_history(run.info.run_id, "loss"))
    if storage == "s3":
        import fsspec

        fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": spec["s3_endpoint_url"]})
        assert fs.exists("trainyard/checkpoints/run-1/checkpoint-13/trainer_state.json"), "uploaded"
    else:
        assert (tmp_path / "checkpoints" / "checkpoint-13" / "trainer_state.json").is_file()

    summary = summary_of(spec)
    assert f"MLflow run: {run.info.run_id} (FAILED)" in summary
    assert f"Failed in model logging (trainer exit code 1): {error}" in summary
    assert "does not train again" in summary and "(step 13)" in summary
    assert "Full traceback: the Airflow log of task train (try 1)" in summary

    blocker.unlink()  # the cause is fixed; Airflow retries the task: same spec, next try
    spec["identity"]["try_number"] = 2
    if storage == "s3":  # a relaunched pod: nothing on local disk, the checkpoint comes from S3
        env["TRAINYARD_SCRATCH"] = str(tmp_path / "pod-2")
    second = run_trainer(spec, env)
    result = result_of(second)
    assert "Training already complete at step 13" in second.stderr
    assert not PROGRESS_LINE.search(second.stderr), "the retry did not train"
    assert "The previous attempt of this run failed in model logging" in second.stderr
    assert result["mlflow_run_id"] == run.info.run_id
    assert result["resumed_from_step"] == result["global_step"] == 13

    run = client.get_run(run.info.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainyard.resumed_from_step"] == "13"
    assert run.data.tags["airflow.try_number"] == "2"
    assert not any(k in run.data.tags for k in ("trainyard.error", "trainyard.error_stage")), "cleared"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == trained_loss_points
    assert len(client.get_metric_history(run.info.run_id, "train_runtime")) == 1, "trained once"
    assert run.data.tags["trainyard.model_uri"] == result["model_uri"]

    import mlflow

    version = mlflow.register_model(result["model_uri"], "tweet-sentiment")
    assert version.run_id == run.info.run_id
    served = mlflow.pyfunc.load_model(f"models:/tweet-sentiment/{version.version}")
    assert len(served.predict([unpunctuated_text(3000)])) == 1


def summary_of(spec: dict) -> str:
    """``trainyard summary``'s text for the pipeline of ``spec``, read from its real MLflow store."""
    from types import SimpleNamespace

    from trainyard.cli.summary import latest_summary

    pipeline = SimpleNamespace(  # only what the summary reads of a ResolvedPipeline
        name=spec["identity"]["pipeline"],
        experiment_name=spec["mlflow"]["experiment_name"],
        registered_model_name=spec["identity"]["pipeline"],
        environment=SimpleNamespace(
            name="local", mlflow=SimpleNamespace(tracking_uri=spec["mlflow"]["tracking_uri"])
        ),
        config=SimpleNamespace(promotion=SimpleNamespace(alias="champion")),
    )
    return latest_summary(pipeline)
